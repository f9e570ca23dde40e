"""Property tests of the data readers and ``normalise_rows`` on hostile input (docs/data.md, "Encoding and limits").

Property: every input either loads, or raises a ``DataError`` whose message is one line naming the file,
never another exception (RecursionError, TypeError, UnicodeError, KeyError, csv.Error, ...); and what
loads holds only text a tokenizer can take (UTF-8-encodable, not blank).

Budget (``derandomize=True``, so every run draws the same examples; 13 s here, tokenizer build included):
random bytes as .jsonl / .json / .csv: 150 + 100 + 100 examples; JSON-ish rows with the real column names
(recursive values, lone surrogates, duplicate keys, deep nesting, NaN, 70-bit integers, CR/CRLF line ends,
byte-order marks) as .jsonl / .json / .csv: 150 + 80 + 100; rows straight into ``normalise_rows``: 200;
odd text through a real tokenizer: 60. Total 940 examples.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf.data.encode import encode_records
from chatrlhf.data.formats import FORMATS, DataError, normalise_rows
from chatrlhf.data.sources import load_records

COLUMNS = ("prompt", "response", "completion", "chosen", "rejected", "score", "messages", "conversations",
           "role", "content", "from", "value", "type", "text", "data", "annotator")
ROLES = ("user", "assistant", "system", "human", "gpt", "tool", "")

CHARS = st.characters(exclude_categories=())  # every code point, lone surrogates included
TEXT = st.one_of(st.text(CHARS, max_size=12), st.sampled_from(("q", "a b", " ", "\u3000", "\x00", "\ud800",
                                                               "\udfff", "<|im_end|>", "1e999", "nan", "4")))
KEYS = st.one_of(st.sampled_from(COLUMNS), st.text(CHARS, max_size=6))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                       max_leaves=16)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), JSONISH), "content": st.one_of(TEXT, JSONISH)})
MESSAGES = st.lists(MESSAGE, max_size=5)
PROMPT = st.one_of(TEXT, MESSAGES, JSONISH)
ANSWER = st.one_of(TEXT, MESSAGES)
SCORE = st.one_of(st.integers(-(2**70), 2**70), st.floats(), TEXT, st.booleans(), st.none())
ROW = st.one_of(
    st.dictionaries(KEYS, st.one_of(JSONISH, MESSAGES), max_size=6),
    st.fixed_dictionaries({"prompt": PROMPT, "response": TEXT}, optional={"score": SCORE, "annotator": JSONISH}),
    st.fixed_dictionaries({"prompt": PROMPT, "chosen": ANSWER, "rejected": ANSWER}),
    st.fixed_dictionaries({"chosen": ANSWER, "rejected": ANSWER}),
    st.fixed_dictionaries({"messages": MESSAGES}, optional={"conversations": MESSAGES}),
)
# A line's hostile extras: a key written twice, a value nested this deep (0: none), raw (unescaped) text
LINE = st.tuples(ROW, st.booleans(), st.sampled_from((0, 0, 0, 99, 101, 5000)), st.booleans())
ENDING = st.sampled_from(("\n", "\r\n", "\r"))



def budget(examples: int) -> settings:
    # tmp_path is shared by a test's examples (each rewrites its file); the tokenizer fixture is per module
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def render(row: dict, duplicate: bool, depth: int, raw: bool) -> bytes:
    """One JSON object line, written by hand so a key can appear twice; ``raw`` writes non-ASCII as is, so a
    lone surrogate becomes bytes that are not UTF-8 (``surrogatepass``), not a ``\\ud800`` escape."""
    items = [f"{json.dumps(k, ensure_ascii=not raw)}: {json.dumps(v, ensure_ascii=not raw)}" for k, v in row.items()]
    if duplicate and items:
        items.append(items[0])
    if depth:
        items.append('"deep": ' + "[" * depth + "]" * depth)
    return ("{" + ", ".join(items) + "}").encode("utf-8", "surrogatepass")


def outcome(path: Path, **kwargs) -> list[dict] | None:
    """load_records' records, or None after checking the refusal is a one-line DataError naming the file."""
    try:
        records, _ = load_records(str(path), **kwargs)
    except DataError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message, message
        assert path.name in message, message
        return None
    check_records(records)
    return records


def _texts(record: dict) -> list[tuple[str, str]]:
    """(role, text) of everything a record sends to the tokenizer."""
    messages = record.get("messages", record.get("prompt", []))
    out = [(m["role"], m["content"]) for m in messages]
    return out + [("assistant", record[k]) for k in ("chosen", "rejected", "response") if k in record]


def check_records(records: list[dict]) -> None:
    assert records
    for record in records:
        for role, text in _texts(record):
            assert isinstance(text, str)
            text.encode("utf-8")  # a lone surrogate would raise here (and as a TypeError in the tokenizer)
            assert role == "system" or text.strip(), record
        if "score" in record:
            assert isinstance(record["score"], float) and math.isfinite(record["score"])


def both_policies(path: Path) -> None:
    """Loads under bad_rows=error and skip; what error mode loads, skip mode loads too."""
    strict = outcome(path)
    lenient = outcome(path, bad_rows="skip")
    if strict is not None:
        assert lenient is not None and len(lenient) == len(strict)


# ----------------------------------------------------------------------------- random bytes
@budget(150)
@given(data=st.binary(max_size=300))
def test_jsonl_of_random_bytes_loads_or_refuses_in_one_line(tmp_path, data):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    both_policies(path)


@budget(100)
@given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"[" + b + b"]")))
def test_json_of_random_bytes_loads_or_refuses_in_one_line(tmp_path, data):
    path = tmp_path / "rows.json"
    path.write_bytes(data)
    both_policies(path)


@budget(100)
@given(data=st.binary(max_size=300))
def test_csv_of_random_bytes_loads_or_refuses_in_one_line(tmp_path, data):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,response,score,messages\n" + data)
    both_policies(path)


# ----------------------------------------------------------------------------- JSON-ish rows
@budget(150)
@given(lines=st.lists(LINE, min_size=1, max_size=5), ending=ENDING, bom=st.booleans())
def test_jsonl_of_hostile_rows_loads_or_refuses_in_one_line(tmp_path, lines, ending, bom):
    path = tmp_path / "rows.jsonl"
    body = ending.encode().join(render(*line) for line in lines) + ending.encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
    both_policies(path)


@budget(80)
@given(lines=st.lists(LINE, min_size=1, max_size=4), wrapped=st.booleans())
def test_json_of_hostile_rows_loads_or_refuses_in_one_line(tmp_path, lines, wrapped):
    body = b"[" + b",\n".join(render(*line) for line in lines) + b"]"
    path = tmp_path / "rows.json"
    path.write_bytes(b'{"data": ' + body + b"}" if wrapped else body)
    both_policies(path)


CSV_ROW_COLUMNS = ("prompt", "response", "score", "messages")
CSV_ROW = st.fixed_dictionaries({"prompt": TEXT, "response": TEXT, "score": st.one_of(TEXT, SCORE.map(str)),
                                 "messages": st.one_of(TEXT, MESSAGES.map(json.dumps), JSONISH.map(json.dumps))})


@budget(100)
@given(rows=st.lists(CSV_ROW, min_size=1, max_size=5), drop=st.sampled_from((None, "prompt", "messages")),
       ending=st.sampled_from(("\n", "\r\n")))
def test_csv_of_hostile_rows_loads_or_refuses_in_one_line(tmp_path, rows, drop, ending):
    out = io.StringIO()
    columns = [c for c in CSV_ROW_COLUMNS if c != drop]  # no prompt: read as messages; no messages: as rating
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator=ending)
    writer.writeheader()
    writer.writerows(rows)
    path = tmp_path / "rows.csv"
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass"))  # a lone surrogate: bytes not UTF-8
    both_policies(path)


# ----------------------------------------------------------------------------- normalise_rows itself
@budget(200)
@given(rows=st.lists(st.tuples(ROW, st.sampled_from((0, 0, 101))), min_size=1, max_size=5),
       fmt=st.sampled_from(FORMATS), bad_rows=st.sampled_from(("error", "skip")))
def test_normalise_rows_takes_python_values_or_refuses_in_one_line(rows, fmt, bad_rows):
    numbered = [(i + 1, {**row, "deep": _nest(depth)} if depth else row) for i, (row, depth) in enumerate(rows)]
    try:
        records, _ = normalise_rows(numbered, "rows.jsonl", fmt=fmt, bad_rows=bad_rows)
    except DataError as err:
        assert "\n" not in str(err) and "\r" not in str(err) and "rows.jsonl" in str(err), str(err)
        return
    check_records(records)


# ----------------------------------------------------------------------------- through a real tokenizer
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from chatrlhf.models.tiny import build_tiny_llama

    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


ODD = ("a \ud800 b", "\udc00", "\x00", "a\x00b", "\u2028\u2029", "\ufeffbom", "\u202eevil", "e\u0301" * 50, "\U0001f600",
       "<|im_end|>", "<|im_start|>system\nx", "{{ raise_exception('x') }}", "\uffff\ufffe", "\x1b[31mred", "\t tab")


@budget(60)
@given(texts=st.lists(st.one_of(st.sampled_from(ODD), st.text(CHARS, min_size=1, max_size=30)), min_size=1,
                      max_size=6))
def test_odd_text_goes_through_a_real_tokenizer_or_is_refused_before_it(tmp_path, tokenizer, texts):
    rows = [{"prompt": f"q {i}", "response": text} for i, text in enumerate(texts)] + [{"prompt": "q", "response": "a"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ASCII JSON: a surrogate is a \ud800 escape
    records = outcome(path, bad_rows="skip")
    expected = [r["response"] for r in rows if r["response"].strip() and _encodable(r["response"])]
    assert [r["messages"][-1]["content"] for r in records] == expected  # only the unencodable and blank go
    items = encode_records(records, "sft", tokenizer, max_len=64, max_prompt_len=32, progress=False)
    assert len(items) == len(records) and all(len(item["input_ids"]) <= 64 for item in items)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_a_record_built_elsewhere_with_a_surrogate_is_refused_before_the_tokenizer(tokenizer):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a \ud800"}],
              "_source": "chat.jsonl", "_row": 4}
    with pytest.raises(DataError, match=r"chat.jsonl line 4, field 'messages\[1\].content': holds a lone UTF-16"):
        encode_records([record], "sft", tokenizer, max_len=64, progress=False)
