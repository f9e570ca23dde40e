"""The calculator tool: exact arithmetic on an expression a model wrote, without ``eval``.

The expression is parsed with ``ast.parse(mode="eval")`` and only these nodes are walked: int and float
constants, ``+ - * / // % **``, unary ``+``/``-`` and parentheses. Every value is a ``fractions.Fraction``,
so ``0.1 + 0.2`` is exactly ``0.3`` and ``1 / 3 * 3`` is ``1``. Anything else (names, calls, attributes,
text, comparisons) is refused with a ``ValueError`` whose message the model reads as the tool's output.

Limits keep one call cheap (microseconds; the fuzz test holds it under 50 ms): at most ``MAX_CHARS``
characters, exponents up to ``MAX_EXPONENT``, every intermediate value below ``MAX_VALUE`` in magnitude and
with a denominator below ``MAX_DENOMINATOR``, so no number ever exceeds a few hundred bits.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from fractions import Fraction

from chatrlhf.environments.tools import Tool

MAX_CHARS = 200
MAX_EXPONENT = 64
MAX_VALUE = 10**30
"""Results (and every step on the way) must stay below this in magnitude."""
MAX_DENOMINATOR = 10**60
"""``(1 / 10**20) ** 4`` is refused: no word problem needs such a fraction, and it bounds every number."""
MAX_LITERAL_EXPONENT = 99
"""``1e-99999999`` is refused before ``Fraction`` builds ten to that power."""
MAX_DEPTH = 100
"""Nesting of the syntax tree (``- - - ... 1``); deeper is refused before the walk could exhaust the stack."""
DECIMALS = 6
ALLOWED = "numbers, + - * / // % ** and parentheses"

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_REFUSED = {
    ast.Name: "names are not allowed",
    ast.Call: "function calls are not allowed (write 2 * (3 + 4), not 2(3 + 4))",
    ast.Attribute: "attributes are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.BitXor: "^ is not a power: write 2 ** 10",
    ast.Tuple: "write numbers without commas (1234, not 1,234)",
}
"""Short reasons for the nodes a model is likeliest to write; any other node gets a generic one."""
_EXPONENT = re.compile(r"[eE]([-+]?[0-9]+)")
_TIMES = re.compile(r"(?<![A-Za-z_])[xX×](?![A-Za-z_])")
"""``23 x 47`` and ``23 × 47`` mean ``*``; the ``x`` of a name such as ``max`` is left alone."""


def evaluate(expression: str) -> str:
    """The value of ``expression``, exactly, as text; ``ValueError`` with a reason the model can read.

    Worked examples:

    >>> evaluate("23 * 47 + 158")       # 1081 + 158
    '1239'
    >>> evaluate("8136 ÷ 24")           # 24 * 339 = 8136
    '339'
    >>> evaluate("(1 + 4) / 2")         # 5/2
    '2.5'
    >>> evaluate("1 / 3")               # 0.3333333... rounded to 6 places
    '0.333333'
    >>> evaluate("2 ** -2 x 12")        # 1/4 * 12
    '3'
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be text, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise ValueError(f"expression too long ({len(expression)} characters, limit {MAX_CHARS})")
    text = _TIMES.sub("*", expression).replace("÷", "/").replace("\u2212", "-").strip().rstrip("=").strip()
    if not text:
        raise ValueError("empty expression: write one such as 23 * 47 + 158")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        # SyntaxError covers too many parentheses; ValueError, a null byte (Python 3.11)
        raise ValueError(f"not an arithmetic expression: use {ALLOWED}") from err
    return format_value(_value(tree.body, text, 0))


def _value(node: ast.AST, text: str, depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise ValueError("expression nested too deeply")
    if isinstance(node, ast.Constant):
        return _constant(node, text)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand, text, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, text, depth + 1), _value(node.right, text, depth + 1)
        try:
            if isinstance(node.op, ast.Pow):
                return _checked(_power(left, right))
            return _checked(Fraction(_BINARY[type(node.op)](left, right)))  # // gives an int
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    what = type(node.op) if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node)
    if what is ast.Tuple:  # 1,234 parses as the pair (1, 234)
        raise ValueError(_REFUSED[ast.Tuple])
    raise ValueError(f"{_REFUSED.get(what, f'{what.__name__} is not allowed')}: use {ALLOWED}")


def _constant(node: ast.Constant, text: str) -> Fraction:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"only numbers are allowed, not {type(value).__name__}: use {ALLOWED}")
    if isinstance(value, int):
        return _checked(Fraction(value), "number too large")
    if not math.isfinite(value) or abs(value) >= MAX_VALUE:
        raise ValueError("number too large (limit 10**30)")
    # the literal as written, so that 0.1 is exactly 1/10 (the float 0.1 is not)
    literal = (ast.get_source_segment(text, node) or repr(value)).replace("_", "")
    exponent = _EXPONENT.search(literal)
    if exponent and abs(int(exponent[1])) > MAX_LITERAL_EXPONENT:  # Fraction would build 10**exponent
        raise ValueError(f"number too small (exponent limit {MAX_LITERAL_EXPONENT})")
    try:
        exact = Fraction(literal)
    except (ValueError, ZeroDivisionError):  # an odd spelling the literal's text has
        raise ValueError(f"cannot read the number {literal[:20]!r}") from None
    return _checked(exact, "number too large")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ValueError("only whole-number exponents are allowed (2 ** 3, not 2 ** 0.5)")
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent too large (limit {MAX_EXPONENT})")
    # both parts of ``base`` are under 300 bits (the checks below), so this is at most ~20,000 bits
    return base ** int(exponent)


def _checked(value: Fraction, too_large: str = "result too large") -> Fraction:
    if abs(value) >= MAX_VALUE:
        raise ValueError(f"{too_large} (limit 10**30)")
    if value.denominator >= MAX_DENOMINATOR:
        raise ValueError("result too small or too fine to compute exactly")
    return value


def format_value(value: Fraction) -> str:
    """An integer as digits; else a decimal rounded half away from zero to ``DECIMALS`` places, trailing
    zeros dropped: 5/2 -> ``'2.5'``, -2/3 -> ``'-0.666667'``, 1/8 -> ``'0.125'``. A non-zero value that
    rounds to 0 is written with 6 significant digits instead (1/10**7 -> ``'1e-07'``), so it is not "0"."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = math.floor(abs(value) * 10**DECIMALS + Fraction(1, 2))
    if scaled == 0:
        return f"{float(value):.6g}"
    whole, frac = divmod(scaled, 10**DECIMALS)
    digits = f"{whole}.{frac:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + digits


def _calculate(expression: str) -> str:
    """The tool's function: ``run_tool`` calls it with the call's JSON arguments."""
    return evaluate(expression)


CALCULATOR = Tool(
    name="calculator",
    description="Evaluates an arithmetic expression with + - * / and parentheses.",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 23 * 47 + 158"}},
                "required": ["expression"]},
    fn=_calculate,
)
"""The shipped calculator tool (``CalculatorEnv`` offers it; the SFT demonstrations call it)."""
