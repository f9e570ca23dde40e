"""The calculator tool (environments/calculator.py): values worked out by hand, every refusal, and a fuzz test
that arbitrary text only ever gives a result or a ValueError, fast."""

import doctest
import operator
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf.environments import answers, calculator
from chatrlhf.environments.calculator import CALCULATOR, evaluate, format_value
from chatrlhf.environments.tools import format_tool_call, parse_tool_calls, run_tool

VALUES = [
    ("23 * 47", "1081"),  # 23 * 47 = 920 + 161
    ("23 * 47 + 158", "1239"),
    ("8136 / 24", "339"),  # 24 * 339 = 7200 + 936
    ("(1 + 4) / 2", "2.5"),
    ("1 / 3", "0.333333"),
    ("2 / 3", "0.666667"),  # 0.6666666... rounds up
    ("-2 / 3", "-0.666667"),
    ("1 / 8", "0.125"),
    ("0.1 + 0.2", "0.3"),  # exact: the float sum would be 0.30000000000000004
    ("1 / 3 * 3", "1"),  # exact: no 0.999999
    ("7 // 2", "3"),
    ("-7 // 2", "-4"),  # floor, as in Python
    ("17 % 5", "2"),
    ("-7 % 3", "2"),
    ("2 ** 10", "1024"),
    ("2 ** -2", "0.25"),
    ("(-3) ** 3", "-27"),
    ("-3 ** 2", "-9"),  # ** binds tighter than unary minus, as in Python
    ("+5 - -5", "10"),
    ("((((2))))", "2"),
    ("2.5 * 4", "10"),
    ("1e3 + 1", "1001"),
    ("1.5e-3", "0.0015"),
    ("1_000 * 2", "2000"),
    ("1e-7", "1e-07"),  # non-zero but under 0.0000005: 6 significant digits, not "0"
    ("0.0000005", "0.000001"),  # half rounds away from zero
    ("23 x 47", "1081"),
    ("23 × 47", "1081"),
    ("2X3", "6"),
    ("8136 ÷ 24", "339"),
    ("5 \u2212 7", "-2"),  # U+2212 minus
    ("  12 + 3 =  ", "15"),  # a trailing "=" is forgiven
    ("10 ** 29 * 9", "900000000000000000000000000000"),  # under 10**30: allowed
]


@pytest.mark.parametrize(("expression", "expected"), VALUES)
def test_values(expression, expected):
    assert evaluate(expression) == expected


REFUSED = [
    ("1 / 0", "division by zero"),
    ("5 // 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("10 ** 30", "result too large"),
    ("2 ** 64 * 2 ** 64", "result too large"),
    ("9" * 31, "number too large"),
    ("1e30", "number too large"),
    ("1e999", "number too large"),
    ("1e-99999999", "number too small"),
    ("2 ** 65", "exponent too large"),
    ("2 ** -65", "exponent too large"),
    ("2 ** 0.5", "only whole-number exponents"),
    ("(1 / 10 ** 20) ** 4", "result too small or too fine"),
    ("1,234 + 1", "write numbers without commas"),
    ("x", "not an arithmetic expression"),
    ("abc", "names are not allowed"),
    ("pi * 2", "names are not allowed"),
    ("max(1, 2)", "function calls are not allowed"),
    ("2(3 + 4)", "function calls are not allowed"),
    ('__import__("os").system("ls")', "not allowed"),
    ("(1).__class__", "attributes are not allowed"),
    ("'abc'", "only numbers are allowed, not str"),
    ("b'1'", "only numbers are allowed, not bytes"),
    ("True + 1", "only numbers are allowed, not bool"),
    ("1j", "only numbers are allowed, not complex"),
    ("1 < 2", "comparisons are not allowed"),
    ("lambda: 1", "lambda is not allowed"),
    ("2 ^ 10", "^ is not a power: write 2 ** 10"),
    ("1 << 2", "LShift is not allowed"),
    ("~1", "Invert is not allowed"),
    ("not 1", "Not is not allowed"),
    ("1 and 2", "BoolOp is not allowed"),
    ("[1]", "List is not allowed"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("import os", "not an arithmetic expression"),
    ("1; 2", "not an arithmetic expression"),
    ("1\x002", "not an arithmetic expression"),
    ("", "empty expression"),
    ("=", "empty expression"),
    ("-" * 150 + "1", "nested too deeply"),
    ("1" + " + 1" * 50, "expression too long (201 characters, limit 200)"),
]


@pytest.mark.parametrize(("expression", "message"), REFUSED)
def test_refusals(expression, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
                       .replace("^", r"\^")):
        evaluate(expression)


def test_non_text_is_refused():
    with pytest.raises(ValueError, match="expression must be text, got int"):
        evaluate(1081)


def test_limits_are_exact():
    assert evaluate("1" + " + 1" * 49) == "50"  # 197 characters
    assert evaluate("2 ** 64") == str(2**64) and evaluate("2 ** -64") == format_value(Fraction(1, 2**64))
    assert evaluate("-" * 100 + "1") == "1"  # 100 nested minus signs: depth 100 is the limit


def test_format_value():
    assert format_value(Fraction(5, 2)) == "2.5"
    assert format_value(Fraction(-1, 2_000_000)) == "-0.000001"  # -0.0000005 rounds away from zero
    assert format_value(Fraction(2999999999, 1000000000)) == "3"  # 2.999999999 rounds to a whole number
    assert format_value(Fraction(-12)) == "-12"


def test_tool_round_trip():
    """The tool as an episode runs it: a call in the shared format, parsed and run."""
    tools = {CALCULATOR.name: CALCULATOR}
    [call] = parse_tool_calls(format_tool_call("calculator", {"expression": "23 * 47 + 158"}), tools)
    assert run_tool(call, tools) == ("1239", True)
    [bad] = parse_tool_calls(format_tool_call("calculator", {"expression": "1 / 0"}), tools)
    assert run_tool(bad, tools) == ("error: division by zero", False)
    assert CALCULATOR.schema()["function"]["parameters"]["required"] == ["expression"]


def test_docstring_examples():
    for module in (calculator, answers):
        assert doctest.testmod(module).failed == 0


ALPHABET = st.sampled_from(list("0123456789+-*/%().eE_ xX×÷,=^<>!~&|'\"abcjsz[]{}:;\\\n\t\x00") + ["**", "//"])


def _evaluate_or_refuse(text: str) -> None:
    # CPU time of this thread, not wall time: on a busy shared machine a preempted call would fail a wall-clock
    # bound although the calculator did no more work
    start = time.thread_time()
    try:
        evaluate(text)
    except ValueError:
        pass  # the only exception allowed: its message becomes the tool's output
    assert time.thread_time() - start < 0.05, text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ALPHABET, max_size=120).map("".join))
def test_fuzz_arithmetic_like_text(text):
    _evaluate_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=250))
def test_fuzz_any_text(text):
    _evaluate_or_refuse(text)


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=10), st.lists(st.sampled_from(sorted(OPS)),
                                                                               min_size=9, max_size=9))
def test_fuzz_agrees_with_fraction_arithmetic(numbers, ops):
    """Left-nested expressions ``((a op b) op c) ...`` against a fold with Python's Fraction operators; a step
    out of the limits must be refused with the limit's message."""
    expression, value = f"({numbers[0]})", Fraction(numbers[0])
    expected = None
    for n, op in zip(numbers[1:], ops):
        expression = f"({expression} {op} ({n}))"
        if n == 0 and op in ("/", "//", "%"):
            expected = "division by zero"
            break
        value = Fraction(OPS[op](value, Fraction(n)))
        if abs(value) >= 10**30 or value.denominator >= 10**60:
            expected = "result too large" if abs(value) >= 10**30 else "result too small"
            break
    if expected is None:
        assert evaluate(expression) == format_value(value)
    else:
        with pytest.raises(ValueError, match=expected):
            evaluate(expression)
