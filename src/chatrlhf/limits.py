"""Reading untrusted JSON and YAML with limits: one place for what every reader refuses.

Data files, ``--config`` files, checkpoint state and the feedback app's request bodies are all read through
:func:`parse_json` / :func:`load_yaml`, which refuse, with one line naming the source and the field path:

- a key given twice in one mapping (both parsers keep the last silently);
- nesting deeper than ``MAX_DEPTH`` (a JSON line nested 100,000 deep otherwise ends in a RecursionError);
- YAML aliases that expand to more than ``MAX_YAML_NODES`` nodes (390 bytes of "billion laughs" would
  otherwise cost seconds and a gigabyte in whatever walks the result);
- integers beyond 64 bits, which no field of chatrlhf can hold and which overflow in numpy/torch/SQLite;
- strings holding a lone UTF-16 surrogate (JSON's ``"\\ud800"``), which UTF-8 tokenizers and files cannot hold;
- JSON's non-standard ``NaN`` / ``Infinity`` constants, and numbers too large for a float (``1e999``).

Torch-free, so the CLI can use it before anything heavy is imported.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 100
"""Deepest nesting of lists/mappings accepted (chatrlhf's own formats need fewer than 10 levels)."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a document may expand to once its aliases are followed."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class InputError(ValueError):
    """Untrusted text broke one of the limits; the message names the source, the field and the limit."""


def _field(path: tuple) -> str:
    """``rows[3].messages[0].content`` from a path of keys and indices ('' at the top)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out if len(out) <= 120 else f"{out[:60]}...{out[-57:]}"  # one readable line, however deep


def _at(where: str, path: tuple) -> str:
    return f"{where}, field '{_field(path)}'" if path else where


def check_value(value: Any, where: str) -> Any:
    """Walks a parsed value (iteratively: depth is what is being bounded) and raises :class:`InputError` on
    nesting deeper than MAX_DEPTH, an integer beyond 64 bits or a string with a lone surrogate."""
    stack = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= MAX_DEPTH:
                raise InputError(f"{_at(where, path)}: nested deeper than {MAX_DEPTH} levels. Fix: flatten it "
                                 "(no chatrlhf format needs that depth)")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((v, (*path, k), depth + 1) for k, v in items)
            if isinstance(node, dict):
                stack.extend((k, (*path, k), depth + 1) for k in node if isinstance(k, str))
        elif isinstance(node, int) and not isinstance(node, bool) and not INT_MIN <= node <= INT_MAX:
            raise InputError(f"{_at(where, path)}: integer {str(node)[:24]}{'...' if len(str(node)) > 24 else ''} "
                             "is beyond 64 bits. Fix: use a number in [-2**63, 2**63 - 1]")
        elif isinstance(node, str):
            _check_text(node, where, path)
        elif isinstance(node, float) and not math.isfinite(node):  # JSON's 1e999 parses as inf
            raise InputError(f"{_at(where, path)}: {node} is not a finite number. Fix: write a finite number")
    return value


def _check_text(text: str, where: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{_at(where, path)}: holds a lone UTF-16 surrogate ({text[err.start]!a} at character "
                         f"{err.start}), which is not text. Fix: write the character itself, or a valid "
                         "surrogate pair") from None


def _pairs_to_dict(where: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise InputError(f"{where}: key {key[:80]!r} appears twice in one object. Fix: keep one (both "
                                 "JSON parsers and people reading the file disagree on which one counts)")
            out[key] = value
        return out

    return hook


def _no_constant(name: str):
    raise InputError(f"'{name}' is not a JSON number. Fix: write a finite number (or null)")


def decode_utf8(data: bytes, where: str) -> str:
    """Bytes -> str, or an :class:`InputError` naming the line and column of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputError(f"{where} line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8 "
                         f"({err.reason}). Fix: save the file as UTF-8") from None


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` with the limits of this module; ``where`` names the source (``data.jsonl line 3``).
    A syntax error is raised as ``json.JSONDecodeError`` (a ValueError) for the caller to word."""
    if isinstance(text, bytes):
        text = decode_utf8(text, where)
    try:
        value = json.loads(text, object_pairs_hook=_pairs_to_dict(where), parse_constant=_no_constant)
    except RecursionError:
        raise InputError(f"{where}: nested deeper than {MAX_DEPTH} levels. Fix: flatten it") from None
    except InputError as err:
        raise InputError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
    except json.JSONDecodeError:
        raise
    except ValueError as err:  # Python's own cap: an integer of more than 4,300 digits
        raise InputError(f"{where}: {_too_long(err)}") from None
    return check_value(value, where)


def _too_long(err: ValueError) -> str:
    return f"a number too long to read ({str(err).split(';')[0]}). Fix: use a number within 64 bits"


# ---- YAML ---------------------------------------------------------------------------------------------------


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    raise InputError(f"line {key_node.start_mark.line + 1}: a mapping key must be a plain "
                                     "value, not a list or mapping")
                if key in seen:
                    raise InputError(f"line {key_node.start_mark.line + 1}: key {str(key)[:80]!r} appears twice "
                                     f"in one mapping (first at line {seen[key]}). Fix: keep one")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _expanded_size(root) -> int:
    """Nodes of the document once every alias is followed (aliases share nodes, so memoised by node),
    capped at MAX_YAML_NODES + 1; a recursive alias (``&a [*a]``) counts as the cap."""
    cap = MAX_YAML_NODES + 1
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:  # post-order without recursion: a deep document must not end in a RecursionError
        node, done = stack.pop()
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in _children(node)), cap)
        elif id(node) in on_path:
            return cap
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the limits of this module (duplicate keys, depth, alias expansion, integers,
    surrogates). A syntax error is raised as ``yaml.YAMLError`` for the caller to word."""

    loader = _yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise InputError(f"{where}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values, or "
                             "refer to themselves. Fix: write the values out, without nested aliases")
        value = loader.construct_document(node)
    except RecursionError:
        raise InputError(f"{where}: nested deeper than {MAX_DEPTH} levels. Fix: flatten it") from None
    except InputError as err:
        raise InputError(str(err) if str(err).startswith(where) else f"{where} {err}") from None
    except ValueError as err:  # the YAML int constructor meets Python's 4,300-digit cap
        raise InputError(f"{where}: {_too_long(err)}") from None
    finally:
        loader.dispose()
    return check_value(value, where)
