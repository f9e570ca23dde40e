"""Hostile data files, one table: every command that reads data (sft, rm, dpo, ppo, grpo, pairs, serve, eval)
fed a file built to break a reader (docs/data.md, "Encoding and limits").

Each case runs through ``hostile.check_case``: exit status 2, no traceback, one error line naming the file,
the line (or index), the field where there is one, and the fix; nothing on disk changed. Then a few runs
prove ``--data.bad_rows skip`` skips and counts such rows and finishes, and that legitimate oddities (a
byte-order mark, CRLF or CR line ends, a 10,000-turn conversation) just work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hostile import WORDS, Case, Env, check_case, copy_rows, param, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # timeout: a serve case that failed to fail would block

GOOD = '{"prompt": "copy: a b", "response": "a b"}'
SURROGATE = r'{"prompt": "copy: a b", "response": "a \ud800 b"}'  # JSON's escape of a lone surrogate
DUPLICATE = '{"prompt": "copy: a b", "response": "a b", "response": "c d"}'
DEEP = '{"prompt": "copy: a b", "response": "a b", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
BIG_INT = '{"prompt": "copy: a b", "response": "a b", "n": ' + "9" * 30 + "}"
NOT_UTF8 = b'{"prompt": "copy: a b", "response": "a \xff b"}'


# ----------------------------------------------------------------------------- file builders
def lines_file(env: Env, name: str, bad: str | bytes, at: int = 3, good: list[str] | None = None) -> Path:
    """``good`` lines (16 copy rows by default) with the hostile line ``bad`` written verbatim at line ``at``."""
    lines = [line.encode() for line in good or [json.dumps(r) for r in copy_rows(16)]]
    lines.insert(at - 1, bad if isinstance(bad, bytes) else bad.encode())
    path = env.root / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def pair_lines() -> list[str]:
    return [json.dumps({"prompt": f"say {w}", "chosen": f"{w} good", "rejected": f"{w} bad"}) for w in WORDS[:8]]


def rating_lines() -> list[str]:
    return [json.dumps({"prompt": f"say {w}", "response": f"{w} {s}", "score": 1 + (i + s) % 5})
            for i, w in enumerate(WORDS[:8]) for s in (0, 2)]


def prompt_lines() -> list[str]:
    return [json.dumps({"prompt": f"say {w}"}) for w in WORDS[:4]]


def eval_lines() -> list[str]:
    return [json.dumps({"id": f"q{i}", "prompt": f"say {w}", "harmful": False}) for i, w in enumerate(WORDS[:4])]


def stage(env: Env, command: str, data: Path, *extra: str) -> list[str]:
    """rm / dpo on a preference (or rating) file, as test_bad_inputs.py builds them."""
    return [command, "--model.name_or_path", str(env.model), "--data.datasets", f"[{data}]", "--data.data_split",
            "0,1,0", "--run.output_dir", str(env.root / "out"), "--run.progress", "false", *extra]


def pairs(env: Env, data: Path, *extra: str) -> list[str]:
    return ["pairs", "--input", f"[{data}]", "--output", str(env.root / "pairs.jsonl"), *extra]


def evaluate(env: Env, data: Path) -> list[str]:
    return ["eval", "--model.name_or_path", str(env.model), "--prompts", str(data), "--output_dir",
            str(env.root / "eval"), "--progress", "false", "--generation.max_new_tokens", "4"]


def serve(env: Env, data: Path) -> list[str]:
    return ["serve", "--model.name_or_path", str(env.model), "--db", str(env.root / "fb.db"), "--prompts", str(data)]


def csv_file(env: Env, name: str, text: bytes) -> Path:
    path = env.root / name
    path.write_bytes(text)
    return path


def messages_cell(content: str) -> str:
    """A CSV cell holding a message list as JSON text (quotes doubled); ``content`` is raw JSON string text."""
    cell = '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "' + content + '"}]'
    return '"' + cell.replace('"', '""') + '"'


def parquet_file(env: Env, name: str, rows: list[dict], truncate: bool = False) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = env.root / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def messages_row(role: object = "user", content: object = "q") -> str:
    return json.dumps({"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "a"}]})


# ----------------------------------------------------------------------------- the builders
def b_sft_surrogate(env):
    return env.sft(data=lines_file(env, "rows.jsonl", SURROGATE))


def b_sft_deep(env):
    return env.sft(data=lines_file(env, "rows.jsonl", DEEP, at=2))


def b_sft_deep_150(env):
    return env.sft(data=lines_file(env, "rows.jsonl", '{"prompt": "q", "response": "a", "x": ' + "[" * 150
                                   + "]" * 150 + "}", at=4))


def b_sft_not_utf8(env):
    return env.sft(data=lines_file(env, "rows.jsonl", NOT_UTF8))


def b_sft_duplicate_key(env):
    return env.sft(data=lines_file(env, "rows.jsonl", DUPLICATE, at=2))


def b_sft_big_int(env):
    return env.sft(data=lines_file(env, "rows.jsonl", BIG_INT, at=5))


def b_sft_many_digits(env):
    return env.sft(data=lines_file(env, "rows.jsonl", '{"prompt": "q", "response": "a", "n": ' + "7" * 5000 + "}"))


def b_sft_nan(env):
    return env.sft(data=lines_file(env, "rows.jsonl", '{"prompt": "q", "response": "a", "w": NaN}'))


def b_sft_long_line(env):
    return env.sft(data=lines_file(env, "rows.jsonl", '{"prompt": "q", "response": "' + "a" * (50 << 20) + '"}', at=2))


def b_sft_nul_bytes(env):
    return env.sft(data=lines_file(env, "rows.jsonl", b'{"prompt": "q", "response": "a\x00b"}'))


def b_sft_utf16(env):
    path = env.root / "rows.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in copy_rows(16)).encode("utf-16"))
    return env.sft(data=path)


def b_sft_json_number(env):
    return env.sft(data=env.write("rows.json", "42"))


def b_sft_json_string(env):
    return env.sft(data=env.write("rows.json", '"copy: a b"'))


def b_sft_json_surrogate(env):
    return env.sft(data=env.write("rows.json", f"[{GOOD}, {SURROGATE}]"))


def b_sft_json_not_utf8(env):
    path = env.root / "rows.json"
    path.write_bytes(b"[" + GOOD.encode() + b",\n" + NOT_UTF8 + b"]")
    return env.sft(data=path)


def b_sft_csv_huge_cell(env):
    return env.sft(data=csv_file(env, "rows.csv", b'prompt,response\nq,a\nq,"' + b"a" * (17 << 20) + b'"\n'))


def b_sft_csv_open_quote(env):
    return env.sft(data=csv_file(env, "rows.csv", b'prompt,response\nq,a\n"q,a\nq,a\n'))


def b_sft_csv_duplicate_column(env):
    return env.sft(data=csv_file(env, "rows.csv", b"prompt,response,prompt\nq,a,r\n"))


def b_sft_csv_not_utf8(env):
    return env.sft(data=csv_file(env, "rows.csv", b"prompt,response\nq,a\nq,a \xe9\n"))


def b_sft_csv_cell_surrogate(env):
    rows = [messages_cell("a"), messages_cell("a"), messages_cell(r"\udfff")]
    return env.sft(data=csv_file(env, "rows.csv", ("messages\n" + "\n".join(rows) + "\n").encode()))


def b_sft_csv_cell_duplicate_key(env):
    cell = '"' + '[{"role": "user", "role": "assistant", "content": "q"}]'.replace('"', '""') + '"'
    return env.sft(data=csv_file(env, "rows.csv", f"messages\n{messages_cell('a')}\n{cell}\n".encode()))


def b_sft_parquet_truncated(env):
    return env.sft(data=parquet_file(env, "rows.parquet", copy_rows(16), truncate=True))


def b_sft_parquet_not_parquet(env):
    return env.sft(data=env.write("rows.parquet", GOOD + "\n"))


def b_sft_parquet_big_int(env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = copy_rows(4)
    table = pa.Table.from_pylist(rows).append_column("n", pa.array([1, 2, 2**64 - 1, 4], type=pa.uint64()))
    pq.write_table(table, env.root / "rows.parquet")
    return env.sft(data=env.root / "rows.parquet")


def b_sft_saved_dataset_corrupt(env):
    from datasets import Dataset

    Dataset.from_list(copy_rows(8)).save_to_disk(str(env.root / "saved"))
    for arrow in (env.root / "saved").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    return env.sft(data=env.root / "saved")


def b_sft_role_list(env):
    return env.sft(data=lines_file(env, "rows.jsonl", messages_row(role=["user"]), good=[messages_row()] * 8))


def b_sft_role_unknown(env):
    return env.sft(data=lines_file(env, "rows.jsonl", messages_row(role="robot"), good=[messages_row()] * 8))


def b_sft_content_part_not_text(env):
    row = messages_row(content=[{"type": "text", "text": {"nested": "q"}}])
    return env.sft(data=lines_file(env, "rows.jsonl", row, good=[messages_row()] * 8))


def b_sft_whitespace_only(env):
    return env.sft(data=lines_file(env, "rows.jsonl", json.dumps({"prompt": "q", "response": "\u3000\u2028 \t"})))


def b_rm_score_1e999(env):
    return stage(env, "rm", lines_file(env, "ratings.jsonl", json.dumps({"prompt": "q", "response": "a",
                                                                         "score": "1e999"}), good=rating_lines()),
                 "--objective", "ratings")


def b_rm_score_bool(env):
    return stage(env, "rm", lines_file(env, "ratings.jsonl", json.dumps({"prompt": "q", "response": "a",
                                                                         "score": True}), good=rating_lines()),
                 "--objective", "ratings")


def b_rm_chosen_surrogate(env):
    bad = r'{"prompt": "say q", "chosen": "\udc80 good", "rejected": "bad"}'
    return stage(env, "rm", lines_file(env, "pairs.jsonl", bad, at=6, good=pair_lines()))


def b_rm_duplicate_chosen(env):
    bad = '{"prompt": "say q", "chosen": "good", "chosen": "bad", "rejected": "bad"}'
    return stage(env, "rm", lines_file(env, "pairs.jsonl", bad, at=2, good=pair_lines()))


def b_dpo_deep(env):
    return stage(env, "dpo", lines_file(env, "pairs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": '
                                        + "[" * 100_000 + "]" * 100_000 + "}", good=pair_lines()))


def b_dpo_not_utf8(env):
    return stage(env, "dpo", lines_file(env, "pairs.jsonl", b'{"prompt": "q", "chosen": "\xc3\x28", "rejected": "b"}',
                                        at=4, good=pair_lines()))


def b_ppo_prompt_surrogate(env):
    data = lines_file(env, "prompts.jsonl", r'{"prompt": "say \ud83d"}', at=2, good=prompt_lines())
    return env.rl("ppo", "--reward", "rater", "--data.datasets", f"[{data}]")


def b_ppo_prompt_role(env):
    bad = json.dumps({"prompt": [{"role": "robot", "content": "q"}]})
    data = lines_file(env, "prompts.jsonl", bad, at=3, good=prompt_lines())
    return env.rl("ppo", "--reward", "rater", "--data.datasets", f"[{data}]")


def b_grpo_prompt_duplicate(env):
    data = lines_file(env, "prompts.jsonl", '{"prompt": "say a", "prompt": "say b"}', at=4, good=prompt_lines())
    return env.rl("grpo", "--reward", "rater", "--data.datasets", f"[{data}]")


def b_grpo_prompt_big_int(env):
    bad = '{"prompt": "say a", "id": -' + "9" * 20 + "}"
    data = lines_file(env, "prompts.jsonl", bad, at=1, good=prompt_lines())
    return env.rl("grpo", "--reward", "rater", "--data.datasets", f"[{data}]")


def b_pairs_score_inf(env):
    return pairs(env, lines_file(env, "ratings.jsonl", '{"prompt": "q", "response": "a", "score": 1e999}',
                                 good=rating_lines()))


def b_pairs_score_nan(env):
    return pairs(env, lines_file(env, "ratings.jsonl", '{"prompt": "q", "response": "a", "score": NaN}',
                                 at=7, good=rating_lines()))


def b_pairs_response_surrogate(env):
    return pairs(env, lines_file(env, "ratings.jsonl", r'{"prompt": "q", "response": "\ud800", "score": 3}',
                                 at=2, good=rating_lines()))


def b_pairs_csv_not_utf8(env):
    return pairs(env, csv_file(env, "ratings.csv", b"prompt,response,score\nq,a,3\nq,\x80,4\n"))


def b_serve_prompt_surrogate(env):
    return serve(env, lines_file(env, "prompts.jsonl", r'{"prompt": "say \ud800"}', at=2, good=prompt_lines()))


def b_serve_prompt_not_utf8(env):
    return serve(env, lines_file(env, "prompts.jsonl", b'{"prompt": "say \xfe"}', at=3, good=prompt_lines()))


def b_eval_surrogate(env):
    return evaluate(env, lines_file(env, "prompts.jsonl", r'{"id": "x", "prompt": "say \ud800"}', at=2,
                                    good=eval_lines()))


def b_eval_not_utf8(env):
    return evaluate(env, lines_file(env, "prompts.jsonl", b'{"id": "x", "prompt": "say \xff"}', good=eval_lines()))


def b_eval_duplicate_key(env):
    return evaluate(env, lines_file(env, "prompts.jsonl", '{"id": "x", "prompt": "a", "prompt": "b"}',
                                    good=eval_lines()))


UTF8_FIX = "Fix: save the file as UTF-8"
SURROGATE_FIX = "Fix: write the character itself"

CASES = [
    # ---- sft, JSON Lines
    Case("sft-jsonl-lone-surrogate", b_sft_surrogate, ("rows.jsonl line 3", "field 'response'", "surrogate",
                                                       SURROGATE_FIX)),
    Case("sft-jsonl-nested-100000-deep", b_sft_deep, ("rows.jsonl line 2", "nested deeper than 100", "Fix: flatten")),
    Case("sft-jsonl-nested-150-deep", b_sft_deep_150, ("rows.jsonl line 4", "field 'x[0][0]", "nested deeper",
                                                       "Fix: flatten")),
    Case("sft-jsonl-invalid-utf8", b_sft_not_utf8, ("rows.jsonl line 3, column 40", "byte 0xff", UTF8_FIX)),
    Case("sft-jsonl-duplicate-key", b_sft_duplicate_key, ("rows.jsonl line 2", "key 'response' appears twice",
                                                          "Fix: keep one")),
    Case("sft-jsonl-int-beyond-64-bits", b_sft_big_int, ("rows.jsonl line 5", "field 'n'", "beyond 64 bits", "Fix:")),
    Case("sft-jsonl-int-5000-digits", b_sft_many_digits, ("rows.jsonl line 3", "number too long", "Fix: use a number within 64 bits")),
    Case("sft-jsonl-nan-constant", b_sft_nan, ("rows.jsonl line 3", "'NaN' is not a JSON number", "Fix: write a finite")),
    Case("sft-jsonl-50mb-line", b_sft_long_line, ("rows.jsonl line 2", "50.0 MiB", "16 MiB", "one JSON object per line")),
    Case("sft-jsonl-nul-byte", b_sft_nul_bytes, ("rows.jsonl line 3", "not valid JSON", "Fix: remove the NUL bytes")),
    Case("sft-jsonl-utf16", b_sft_utf16, ("rows.jsonl line 1, column 1", "byte 0xff", UTF8_FIX)),
    Case("sft-messages-role-is-a-list", b_sft_role_list, ("rows.jsonl line 3", "field 'messages'", "unknown role",
                                                          "Fix: use one of system, user, assistant, tool")),
    Case("sft-messages-unknown-role", b_sft_role_unknown, ("rows.jsonl line 3", "field 'messages'", "'robot'",
                                                           "Fix: use one of")),
    Case("sft-messages-content-part-not-text", b_sft_content_part_not_text, ("rows.jsonl line 3", "field 'messages'",
                                                                             "got list", "Fix:")),
    Case("sft-unicode-whitespace-only", b_sft_whitespace_only, ("rows.jsonl line 3", "field 'response'", "whitespace",
                                                                "Fix: remove the row")),
    # ---- sft, .json documents
    Case("sft-json-is-a-number", b_sft_json_number, ("rows.json", "JSON int at the top level", "Fix: store a list")),
    Case("sft-json-is-a-string", b_sft_json_string, ("rows.json", "JSON str at the top level", "Fix: store a list")),
    Case("sft-json-lone-surrogate", b_sft_json_surrogate, ("rows.json", "field '[1].response'", "surrogate",
                                                           SURROGATE_FIX)),
    Case("sft-json-invalid-utf8", b_sft_json_not_utf8, ("rows.json line 2, column 40", "byte 0xff", UTF8_FIX)),
    # ---- sft, CSV
    Case("sft-csv-17mb-cell", b_sft_csv_huge_cell, ("rows.csv line 3", "field larger than field limit",
                                                    "Fix: keep each cell under 16 MiB")),
    Case("sft-csv-unclosed-quote", b_sft_csv_open_quote, ("rows.csv line 3", "fewer cells", "unbalanced quote")),
    Case("sft-csv-column-twice", b_sft_csv_duplicate_column, ("rows.csv line 1", "column 'prompt' twice",
                                                              "Fix: rename")),
    Case("sft-csv-invalid-utf8", b_sft_csv_not_utf8, ("rows.csv line 3, column 5", "byte 0xe9", UTF8_FIX)),
    Case("sft-csv-messages-cell-surrogate", b_sft_csv_cell_surrogate, ("rows.csv line 4", "cell 'messages'",
                                                                       "field '[1].content'", "surrogate",
                                                                       SURROGATE_FIX)),
    Case("sft-csv-messages-cell-duplicate-key", b_sft_csv_cell_duplicate_key, ("rows.csv line 3", "cell 'messages'",
                                                                               "key 'role' appears twice",
                                                                               "Fix: keep one")),
    # ---- sft, Parquet and saved datasets
    Case("sft-parquet-truncated", b_sft_parquet_truncated, ("rows.parquet", "not a readable Parquet file",
                                                            "Fix: re-export")),
    Case("sft-parquet-not-parquet", b_sft_parquet_not_parquet, ("rows.parquet", "not a readable Parquet file",
                                                                "Fix: re-export")),
    Case("sft-parquet-uint64-beyond-int64", b_sft_parquet_big_int, ("rows.parquet index 2", "field 'n'",
                                                                    "beyond 64 bits", "Fix:")),
    Case("sft-saved-dataset-truncated", b_sft_saved_dataset_corrupt, ("saved", "Fix: save it again")),
    # ---- rm / dpo
    Case("rm-ratings-score-1e999-text", b_rm_score_1e999, ("ratings.jsonl line 3", "field 'score'", "score is inf",
                                                           "Fix: store a finite number")),
    Case("rm-ratings-score-true", b_rm_score_bool, ("ratings.jsonl line 3", "field 'score'", "got bool",
                                                    "Fix: store a number")),
    Case("rm-chosen-lone-surrogate", b_rm_chosen_surrogate, ("pairs.jsonl line 6", "field 'chosen'", "surrogate",
                                                             SURROGATE_FIX)),
    Case("rm-chosen-twice", b_rm_duplicate_chosen, ("pairs.jsonl line 2", "key 'chosen' appears twice",
                                                    "Fix: keep one")),
    Case("dpo-rejected-nested-100000-deep", b_dpo_deep, ("pairs.jsonl line 3", "nested deeper than 100",
                                                         "Fix: flatten")),
    Case("dpo-invalid-utf8", b_dpo_not_utf8, ("pairs.jsonl line 4, column 28", "byte 0xc3", UTF8_FIX)),
    # ---- ppo / grpo prompts
    Case("ppo-prompt-lone-surrogate", b_ppo_prompt_surrogate, ("prompts.jsonl line 2", "field 'prompt'", "surrogate",
                                                               SURROGATE_FIX)),
    Case("ppo-prompt-role-robot", b_ppo_prompt_role, ("prompts.jsonl line 3", "field 'prompt'", "unknown role 'robot'",
                                                     "Fix: use one of")),
    Case("grpo-prompt-twice", b_grpo_prompt_duplicate, ("prompts.jsonl line 4", "key 'prompt' appears twice",
                                                        "Fix: keep one")),
    Case("grpo-id-beyond-64-bits", b_grpo_prompt_big_int, ("prompts.jsonl line 1", "field 'id'", "beyond 64 bits")),
    # ---- chatrlhf pairs
    Case("pairs-score-1e999", b_pairs_score_inf, ("ratings.jsonl line 3", "field 'score'", "inf is not a finite number",
                                                  "Fix: write a finite number")),
    Case("pairs-score-nan", b_pairs_score_nan, ("ratings.jsonl line 7", "'NaN' is not a JSON number", "Fix:")),
    Case("pairs-response-lone-surrogate", b_pairs_response_surrogate, ("ratings.jsonl line 2", "field 'response'",
                                                                       "surrogate", SURROGATE_FIX)),
    Case("pairs-csv-invalid-utf8", b_pairs_csv_not_utf8, ("ratings.csv line 3, column 3", "byte 0x80", UTF8_FIX)),
    # ---- chatrlhf serve --prompts / chatrlhf eval --prompts
    Case("serve-prompt-lone-surrogate", b_serve_prompt_surrogate, ("prompts.jsonl line 2", "field 'prompt'",
                                                                   "surrogate", SURROGATE_FIX)),
    Case("serve-prompts-invalid-utf8", b_serve_prompt_not_utf8, ("prompts.jsonl line 3, column 17", "byte 0xfe",
                                                                 UTF8_FIX)),
    Case("eval-prompt-lone-surrogate", b_eval_surrogate, ("prompts.jsonl line 2", "field 'prompt'", "surrogate")),
    Case("eval-prompts-invalid-utf8", b_eval_not_utf8, ("prompts.jsonl line 3, column", UTF8_FIX)),
    Case("eval-prompt-duplicate-key", b_eval_duplicate_key, ("prompts.jsonl line 3", "key 'prompt' appears twice")),
]


@pytest.mark.parametrize("case", [param(c) for c in CASES])
def test_hostile_data_fails_clearly_and_overwrites_nothing(case, env, capsys):
    check_case(case, env, capsys)


def test_table_covers_every_command_that_reads_data():
    assert len([c for c in CASES if not c.missing]) >= 35 and len({c.id for c in CASES}) == len(CASES)
    assert {"sft", "rm", "dpo", "ppo", "grpo", "pairs", "serve", "eval"} <= {c.id.split("-")[0] for c in CASES}


# ----------------------------------------------------------------------------- bad_rows=skip
def _skipped(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def _finishes(argv: list[str], capsys, caplog) -> str:
    """Runs argv, which must exit 0; returns the one 'skipped N of M rows' log line."""
    caplog.set_level(logging.WARNING, logger="chatrlhf.data.formats")
    code, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    return _skipped(caplog)


def test_skip_drops_every_row_that_breaks_a_limit_and_finishes(env, capsys, caplog):
    good = [json.dumps(r) for r in copy_rows(16)]
    hostile = [SURROGATE, NOT_UTF8, DUPLICATE, DEEP, BIG_INT, '{"prompt": "q", "response": "a", "w": Infinity}',
               '{"prompt": "q", "response": "' + "a" * (17 << 20) + '"}']
    lines = [line.encode() for line in good[:8]] + [h if isinstance(h, bytes) else h.encode() for h in hostile]
    path = env.root / "rows.jsonl"
    path.write_bytes(b"\n".join(lines + [line.encode() for line in good[8:]]) + b"\n")
    line = _finishes(env.sft("--data.bad_rows", "skip", data=path), capsys, caplog)
    assert "skipped 7 of 23 rows" in line, line
    assert "rows.jsonl line 9, field 'response': holds a lone UTF-16 surrogate" in line, line
    assert (env.root / "out" / "model" / "config.json").is_file()


def test_skip_drops_bad_csv_rows_and_finishes(env, capsys, caplog):
    rows = [f"copy: {w},{w}" for w in WORDS[:12]]
    text = "prompt,response\n" + "\n".join(rows[:6] + ["copy: x", "copy: y,y,extra"] + rows[6:]) + "\n"
    line = _finishes(env.sft("--data.bad_rows", "skip", data=csv_file(env, "rows.csv", text.encode())), capsys, caplog)
    assert "skipped 2 of 14 rows" in line and "rows.csv line 8: has fewer cells" in line, line


def test_pairs_skip_drops_hostile_ratings_and_writes_pairs(env, capsys, caplog):
    hostile = ['{"prompt": "q", "response": "a", "score": 1e999}', r'{"prompt": "q", "response": "\ud800", "score": 1}',
               '{"prompt": "q", "response": "a", "score": 2, "score": 5}']
    data = env.root / "ratings.jsonl"
    data.write_text("\n".join(rating_lines()[:4] + hostile + rating_lines()[4:]) + "\n")
    line = _finishes(pairs(env, data, "--bad_rows", "skip"), capsys, caplog)
    assert "skipped 3 of 19 rows" in line, line
    written = [json.loads(r) for r in (env.root / "pairs.jsonl").read_text().splitlines()]
    assert written and all(r["prompt"][0]["content"] != "q" for r in written)  # the hostile rows left nothing


# ----------------------------------------------------------------------------- legitimate oddities
def _trains(argv: list[str], capsys, env: Env) -> None:
    code, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert (env.root / "out" / "model" / "config.json").is_file()


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_bom_and_crlf_or_cr_line_ends_just_work(env, capsys, line_end):
    body = line_end.join(json.dumps(r).encode() for r in copy_rows(16)) + line_end
    path = env.root / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body)
    _trains(env.sft(data=path), capsys, env)


def test_csv_with_bom_and_crlf_just_works(env, capsys):
    text = "prompt,response\r\n" + "".join(f"{r['prompt']},{r['response']}\r\n" for r in copy_rows(16))
    _trains(env.sft(data=csv_file(env, "rows.csv", b"\xef\xbb\xbf" + text.encode())), capsys, env)


def test_conversation_of_10000_turns_trains(env, capsys):
    turns = [{"role": role, "content": f"{w} {i}"} for i in range(5000)
             for role, w in (("user", "q"), ("assistant", "a"))]
    rows = [{"messages": turns}] + [{"messages": [{"role": "user", "content": r["prompt"]},
                                                  {"role": "assistant", "content": r["response"]}]}
                                    for r in copy_rows(15)]
    _trains(env.sft("--data.max_len", "64", data=env.jsonl("rows.jsonl", rows)), capsys, env)
