"""chatrlhf.limits: what every reader of untrusted JSON/YAML refuses, and what it lets through unchanged."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from chatrlhf.limits import MAX_DEPTH, InputError, check_value, decode_utf8, load_yaml, parse_json

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))

JSON_REFUSED = [
    ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH}"),
    ('{"x": ' + "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH + "}", "field 'x" + "[0]" * 3),
    ('{"a": "\\ud800"}', "field 'a': holds a lone UTF-16 surrogate"),
    ('{"a": [1, {"b": 123456789012345678901}]}', "field 'a[1].b': integer 123456789012345678901 is beyond 64 bits"),
    ('{"a": NaN}', "'NaN' is not a JSON number"),
    ('{"a": -Infinity}', "'-Infinity' is not a JSON number"),
    ('{"a": 1e999}', "field 'a': inf is not a finite number"),
    ('{"a": ' + "9" * 5000 + "}", "a number too long to read"),
    (b'{"a": "caf\xe9"}', "line 1, column 11: byte 0xe9 is not UTF-8"),
    (b'{"a": 1}\n{"b": "\xff"}', "line 2, column 8: byte 0xff is not UTF-8"),
]


@pytest.mark.parametrize("text, fragment", JSON_REFUSED, ids=range(len(JSON_REFUSED)))
def test_parse_json_refuses_with_source_and_field(text, fragment):
    with pytest.raises(InputError) as err:
        parse_json(text, "rows.jsonl line 3")
    message = str(err.value)
    assert message.startswith("rows.jsonl line 3") and fragment in message and "Fix:" in message, message
    assert "\n" not in message and len(message) < 400


def test_parse_json_keeps_what_is_fine():
    text = '{"a": [1, -2.5, true, null, "\\ud83d\\ude00", {"b": 9223372036854775807}], "c": ' + "[" * 99 + "]" * 99 + "}"
    assert parse_json(text, "x") == json.loads(text)
    assert parse_json(b'\xef\xbb\xbf{"a": 1}'.decode("utf-8-sig").encode(), "x") == {"a": 1}
    with pytest.raises(json.JSONDecodeError):  # a syntax error stays the caller's to word
        parse_json('{"a": ', "x")


YAML_REFUSED = [
    ("a: 1\nb: 2\na: 3\n", "line 3: key 'a' appears twice in one mapping (first at line 1)"),
    ("a: {x: 1, x: 2}\n", "key 'x' appears twice"),
    (BOMB, "expand to more than 100,000 values"),
    ("a: &x [1, *x]\n", "refer to themselves"),
    ("[" * 5000 + "]" * 5000, "nested deeper"),
    (f"a: {2**64}\n", "field 'a': integer 18446744073709551616 is beyond 64 bits"),
    ("a: .inf\n", "field 'a': inf is not a finite number"),
    ('a: "\\ud800"\n', "lone UTF-16 surrogate"),
    ("? [1, 2]\n: x\n", "mapping key must be a plain value"),
]


@pytest.mark.parametrize("text, fragment", YAML_REFUSED, ids=range(len(YAML_REFUSED)))
def test_load_yaml_refuses_with_source(text, fragment):
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        load_yaml(text, "cfg.yaml")
    assert str(err.value).startswith("cfg.yaml") and fragment in str(err.value), str(err.value)
    assert time.perf_counter() - t0 < 5  # the bomb is refused before it is expanded


def test_load_yaml_keeps_aliases_merges_and_plain_documents():
    text = "base: &b {lr: 1.0e-5, betas: [0.9, 0.95]}\nsft:\n  <<: *b\n  seed: 1\nrm: *b\n"
    assert load_yaml(text, "x") == yaml.safe_load(text)
    assert load_yaml("", "x") is None
    with pytest.raises(yaml.YAMLError):  # a syntax error stays the caller's to word
        load_yaml("a: [1\n", "x")


def test_decode_utf8_and_check_value():
    assert decode_utf8("héllo\n".encode(), "f") == "héllo\n"
    with pytest.raises(InputError, match=r"^f line 2, column 3: byte 0xff"):
        decode_utf8(b"ok\nab\xffc", "f")
    assert check_value({"k": [1, 2.5, "x"]}, "w") == {"k": [1, 2.5, "x"]}
    with pytest.raises(InputError, match="field 'k\\[0\\]'"):
        check_value({"k": [float("nan")]}, "w")
