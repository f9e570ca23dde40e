"""Formats: detection from every file type, normalisation, validation messages, sources, conversions."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from chatrlhf.data import sources  # noqa: E402
from chatrlhf.data.convert import convert_records  # noqa: E402
from chatrlhf.data.formats import DataError, detect_format, parse_hh  # noqa: E402
from chatrlhf.data.sources import load_records  # noqa: E402

HH_CHOSEN = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: capital of france?\n\nAssistant: Paris."
HH_REJECTED = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: capital of france?\n\nAssistant: Rome."
USER_Q = [{"role": "user", "content": "capital of france?"}]

# format -> (rows, expected kind, expected canonical fields of the first record)
FLAT_CASES = {
    "preference": ([{"prompt": "capital of france?", "chosen": "Paris.", "rejected": "Rome.", "id": 7}],
                   "preference", {"prompt": USER_Q, "chosen": "Paris.", "rejected": "Rome."}),
    "hh": ([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "preference",
           {"prompt": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                       *USER_Q], "chosen": "Paris.", "rejected": "Rome."}),
    "sft": ([{"prompt": "capital of france?", "response": "Paris."}], "sft",
            {"messages": [*USER_Q, {"role": "assistant", "content": "Paris."}]}),
    "sft-completion": ([{"prompt": "capital of france?", "completion": "Paris."}], "sft",
                       {"messages": [*USER_Q, {"role": "assistant", "content": "Paris."}]}),
    "prompt": ([{"prompt": "capital of france?", "category": "geo"}], "prompt", {"prompt": USER_Q}),
    "rating": ([{"prompt": "capital of france?", "response": "Paris.", "score": 5}], "rating",
               {"prompt": USER_Q, "response": "Paris.", "score": 5.0}),
}
CONVERSATION = [{"role": "system", "content": "be brief"}, *USER_Q, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "and spain?"}, {"role": "assistant", "content": "Madrid."}]


def write(path, rows):
    """Writes rows in the format the suffix names; returns the path as str."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def canonical(record):
    return {k: v for k, v in record.items() if k not in ("meta", "_source", "_row")}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("case", sorted(FLAT_CASES))
def test_every_format_is_detected_from_every_file_type(tmp_path, suffix, case):
    rows, kind, expected = FLAT_CASES[case]
    records, got_kind = load_records(write(tmp_path / f"data{suffix}", rows))
    assert got_kind == kind
    expected = {**expected, "score": 5.0} if kind == "rating" else expected
    assert canonical(records[0]) == expected
    assert records[0]["_row"] == (2 if suffix == ".csv" else 1 if suffix == ".jsonl" else 0)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_messages_format_from_every_file_type(tmp_path, suffix):
    records, kind = load_records(write(tmp_path / f"chat{suffix}", [{"messages": CONVERSATION}]))
    assert kind == "sft"
    assert records[0]["messages"] == CONVERSATION


def test_extra_columns_are_kept_as_meta(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"id": 3, "category": "geo", "prompt": "hi", "harmful": False}])
    records, kind = load_records(path)
    assert kind == "prompt"
    assert records[0]["meta"] == {"id": 3, "category": "geo", "harmful": False}
    assert records[0]["_source"] == path


def test_sharegpt_conversations_are_mapped_to_roles(tmp_path):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    records, kind = load_records(write(tmp_path / "s.json", [{"conversations": conv}]))
    assert (kind, records[0]["messages"]) == ("sft", [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}])


def test_message_list_preference_uses_the_shared_prefix(tmp_path):
    prefix = [{"role": "user", "content": "q"}]
    row = {"chosen": [*prefix, {"role": "assistant", "content": "good"}],
           "rejected": [*prefix, {"role": "assistant", "content": "bad"}]}
    records, kind = load_records(write(tmp_path / "m.jsonl", [row]))
    assert kind == "preference"
    assert canonical(records[0]) == {"prompt": prefix, "chosen": "good", "rejected": "bad"}


def test_answer_only_message_lists_take_the_prompt_column(tmp_path):
    row = {"prompt": "q", "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    records, kind = load_records(write(tmp_path / "u.jsonl", [row]))
    assert kind == "preference"
    assert canonical(records[0]) == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good",
                                     "rejected": "bad"}


def test_hh_multi_turn_parsing():
    prompt, answer = parse_hh(HH_CHOSEN, "chosen")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[1]["content"] == "hello!" and answer == "Paris."
    # some copies drop the leading blank line
    assert parse_hh("Human: a\n\nAssistant: b", "chosen") == ([{"role": "user", "content": "a"}], "b")


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path / "pairs.jsonl", FLAT_CASES["preference"][0])
    records, kind = load_records(path, fmt="prompt")
    assert kind == "prompt" and records[0]["prompt"] == USER_Q
    assert set(records[0]["meta"]) == {"chosen", "rejected", "id"}


def test_json_file_holding_json_lines_is_accepted(tmp_path):
    path = tmp_path / "exported.json"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    records, _ = load_records(str(path))
    assert [r["prompt"][0]["content"] for r in records] == ["a", "b"]


def test_detect_format_rules():
    assert detect_format(["prompt", "response", "chosen", "rejected"]) == "preference"  # rm-static
    assert detect_format(["chosen", "rejected"]) == "hh"
    assert detect_format(["chosen", "rejected"], {"chosen": [{"role": "user"}]}) == "messages"
    assert detect_format(["prompt", "response", "score"]) == "rating"


# ----------------------------------------------------------------------------- validation errors
GOOD_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
ERROR_CASES = [
    # (name, rows, fmt, row label expected, field, words in the message)
    ("missing column", [GOOD_PAIR, {"prompt": "q", "chosen": "a"}], "auto", "line 2", "rejected",
     ["missing column", "columns found", "prompt+chosen+rejected"]),
    ("wrong type", [{**GOOD_PAIR, "chosen": 3}], "auto", "line 1", "chosen", ["expected a string", "int"]),
    ("empty response", [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "  "}], "auto",
     "line 2", "response", ["empty"]),
    ("empty prompt", [{"prompt": " \n", "response": "a"}], "auto", "line 1", "prompt", ["empty"]),
    ("identical pair", [GOOD_PAIR, GOOD_PAIR, {**GOOD_PAIR, "rejected": "a "}], "auto", "line 3", "rejected",
     ["identical", "remove the row"]),
    ("non-numeric score", [{"prompt": "q", "response": "a", "score": "great"}], "auto", "line 1", "score",
     ["not numeric"]),
    ("unknown role", [{"messages": [{"role": "bot", "content": "x"}]}], "auto", "line 1", "messages",
     ["unknown role 'bot'", "system, user, assistant"]),
    ("prompt not ending with user", [{"prompt": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}],
     "auto", "line 1", "prompt", ["last message", "'assistant'"]),
    ("hh prefixes differ", [{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: other\n\nAssistant: Rome."}], "hh",
     "line 1", "rejected", ["do not share"]),
    ("no assistant turn", [{"messages": USER_Q}], "auto", "line 1", "messages", ["no assistant turn"]),
    ("explicit format, missing column", [{"prompt": "q"}], "rating", "line 1", "response or completion",
     ["missing column", "format 'rating'"]),
]


@pytest.mark.parametrize("name,rows,fmt,row,field,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_validation_errors_name_file_row_field(tmp_path, name, rows, fmt, row, field, words):
    path = write(tmp_path / "train_file.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(path, fmt=fmt)
    msg = str(info.value)
    assert f"train_file.jsonl {row}," in msg
    assert f"field '{field}'" in msg
    assert "Fix:" in msg
    for word in words:
        assert word in msg


def test_csv_error_reports_the_file_line(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text('prompt,response,score\nq,"multi\nline answer",4\nq,a,lots\n')
    with pytest.raises(DataError, match=r"ratings.csv line 4, field 'score': score 'lots' is not numeric"):
        load_records(str(path))


def test_parquet_error_reports_the_index(tmp_path):
    path = write(tmp_path / "d.parquet", [GOOD_PAIR, {**GOOD_PAIR, "chosen": "", "rejected": "x"}])
    with pytest.raises(DataError, match=r"d.parquet index 1, field 'chosen'"):
        load_records(path)


def test_unknown_columns_list_what_was_found(tmp_path):
    path = write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl line 1: cannot tell the format .*\['answer', 'question'\]"):
        load_records(path)


def test_unparseable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 3: is not valid JSON"):
        load_records(str(path))


def test_unparseable_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=r"broken.json: is not valid JSON: .* line 3 column"):
        load_records(str(path))


def test_bad_rows_skip_keeps_the_good_rows_and_empty_result_raises(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [GOOD_PAIR, {**GOOD_PAIR, "rejected": "a"}, {**GOOD_PAIR, "chosen": "c"}])
    records, _ = load_records(path, bad_rows="skip")
    assert [r["_row"] for r in records] == [1, 3]
    path = write(tmp_path / "allbad.jsonl", [{**GOOD_PAIR, "rejected": "a"}])
    with pytest.raises(DataError, match=r"allbad.jsonl: no usable rows left \(1 read, 1 invalid"):
        load_records(path, bad_rows="skip")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "x.txt"))


def test_hub_name_fails_clearly_when_offline():
    with pytest.raises(DataError, match="could not be loaded as a local file or a hub dataset"):
        load_records("nobody-here/no-such-dataset")


# ----------------------------------------------------------------------------- other sources
def test_saved_datasets_dir_with_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([GOOD_PAIR] * 3),
                 "test": Dataset.from_list([{"prompt": "t", "chosen": "x", "rejected": "y"}])}
                ).save_to_disk(tmp_path / "saved")
    train, kind = load_records(str(tmp_path / "saved"))
    test, _ = load_records(str(tmp_path / "saved") + "@test")
    assert (len(train), len(test), kind) == (3, 1, "preference")
    assert test[0]["chosen"] == "x"
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], not 'valid'"):
        load_records(str(tmp_path / "saved"), split="valid")


def test_demo_sources_resolve_in_the_package_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEMO_DIR", tmp_path)
    write(tmp_path / "pairs.jsonl", [{**GOOD_PAIR, "topic": "t"}])
    write(tmp_path / "prompts_train.jsonl", [{"id": 1, "category": "c", "prompt": "p", "harmful": True}])
    assert load_records("demo")[1] == "preference"
    records, kind = load_records("demo:prompts_train")
    assert kind == "prompt" and records[0]["meta"]["harmful"] is True
    with pytest.raises(DataError, match="demo:nothing: no demo data set 'nothing'.*demo:pairs, demo:prompts_train"):
        load_records("demo:nothing")


# ----------------------------------------------------------------------------- conversions
def test_conversions_between_kinds(tmp_path):
    pairs, _ = load_records(write(tmp_path / "p.jsonl", [GOOD_PAIR]))
    assert convert_records(pairs, "preference", "sft")[0]["messages"] == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    chats, _ = load_records(write(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]))
    assert convert_records(chats, "sft", "prompt")[0]["prompt"] == CONVERSATION[:4]


@pytest.mark.parametrize("from_rows,to_kind,hint", [
    ([{"prompt": "q", "response": "a", "score": 3}], "preference", "pairwise reward model needs"),
    ([{"prompt": "q"}], "sft", "demonstration answers"),
])
def test_impossible_conversions_say_why(tmp_path, from_rows, to_kind, hint):
    records, kind = load_records(write(tmp_path / "src.jsonl", from_rows))
    with pytest.raises(DataError, match=f"src.jsonl: holds {kind} records.*{hint}"):
        convert_records(records, kind, to_kind)


# ----------------------------------------------------------------------------- hostile files (readers.py)
def test_bom_crlf_and_lone_cr_lines_are_numbered_as_text_mode_reads_them(tmp_path):
    row = json.dumps({"prompt": "q", "response": "a"}).encode()
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\r" + row + b"\r\n\r\n" + row + b"\n" + b"{bad\r\n")
    with pytest.raises(DataError, match=r"mixed.jsonl line 5: is not valid JSON"):
        sources.load_rows(str(path))
    skipped = []
    _, rows = sources.load_rows(str(path), skipped=skipped)
    assert [n for n, _ in rows] == [1, 2, 4] and len(skipped) == 1 and "line 5" in skipped[0]


def test_a_line_over_the_row_limit_is_refused_or_skipped_without_losing_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr("chatrlhf.data.readers.MAX_ROW_BYTES", 64)
    short = json.dumps({"prompt": "q", "response": "a"})
    path = tmp_path / "long.jsonl"
    path.write_text(short + "\n" + json.dumps({"prompt": "q", "response": "a" * 3_000_000}) + "\n" + short + "\n")
    with pytest.raises(DataError, match=r"long.jsonl line 2: is 2.9 MiB long, over the 0 MiB"):
        load_records(str(path))
    records, _ = load_records(str(path), bad_rows="skip")
    assert [r["_row"] for r in records] == [1, 3]  # the rest of line 2 was read past, not taken as line 3


def test_limit_errors_in_skip_mode_are_counted_with_the_other_bad_rows(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": "\\ud800"}\n'
                     b'{"prompt": "q", "response": "\xff"}\n{"prompt": "q", "response": " "}\n')
    with caplog.at_level("WARNING", logger="chatrlhf.data.formats"):
        records, _ = load_records(str(path), bad_rows="skip")
    assert [r["_row"] for r in records] == [1]
    assert "skipped 3 of 4 rows" in caplog.text and "rows.jsonl line 2, field 'response': holds a lone" in caplog.text


def test_rows_from_any_reader_meet_the_limits_before_normalising(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["q", "q"], "response": ["a", "b"], "n": pa.array([1, 2**64 - 1], pa.uint64())})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet index 1, field 'n': integer 18446744073709551615 is beyond"):
        load_records(str(tmp_path / "d.parquet"))
    records, _ = load_records(str(tmp_path / "d.parquet"), bad_rows="skip")
    assert [r["_row"] for r in records] == [0]


def test_a_key_with_a_line_break_still_gives_a_one_line_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a", "odd\nkey": "\ud800"}) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert "\n" not in str(err.value) and "field 'odd\\nkey'" in str(err.value)
