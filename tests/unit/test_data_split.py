"""Phase split, train/eval holdout, blending and prepare_records."""

import json
from collections import Counter

import pytest

from chatrlhf.data.formats import DataError
from chatrlhf.data.split import (
    blend,
    parse_split,
    phase_bounds,
    phase_split,
    prepare_records,
    train_eval_split,
)


def test_parse_split_normalises():
    assert parse_split("2,4,4") == pytest.approx([0.2, 0.4, 0.4], rel=1e-12)
    assert parse_split([1, 0, 1]) == pytest.approx([0.5, 0.0, 0.5], rel=1e-12)


@pytest.mark.parametrize("spec", ["2,4", "1,2,3,4", "a,b,c", "1,-1,2", "0,0,0", "1,nan,1"])
def test_bad_split_spec_names_the_flag(spec):
    with pytest.raises(DataError, match=r"data\.data_split="):
        parse_split(spec)


def test_phase_bounds_round_cumulative_shares():
    # n=10, 0.2/0.4/0.4 -> cumulative 2, 6, 10
    assert phase_bounds(10, [0.2, 0.4, 0.4]) == [0, 2, 6, 10]
    # n=7: cumulative 1.4 -> 1, 4.2 -> 4, then 7 (parts 1, 3, 3 sum to 7)
    assert phase_bounds(7, [0.2, 0.4, 0.4]) == [0, 1, 4, 7]


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1001])
def test_phases_are_disjoint_and_cover_everything(n):
    rows = list(range(n))
    parts = [phase_split(rows, "2,4,4", p, seed=1234) for p in (1, 2, 3)]
    assert sorted(r for part in parts for r in part) == rows
    assert sum(len(p) for p in parts) == n
    if n == 1001:
        assert [len(p) for p in parts] == [200, 401, 400]  # bounds 200, 601 (600.6 rounds up), 1001


def test_phase_split_is_stable_and_seed_dependent():
    rows = [f"r{i}" for i in range(200)]
    first, again = phase_split(rows, "2,4,4", 2, seed=7), phase_split(list(rows), "2,4,4", 2, seed=7)
    assert first == again
    assert phase_split(rows, "2,4,4", 2, seed=8) != first
    # membership is random but the subset keeps the input order
    assert first == sorted(first, key=rows.index)
    assert first != rows[: len(first)]


def test_phase_split_zero_share_is_empty():
    assert phase_split(list(range(50)), "1,0,1", 2) == []


def test_train_eval_split_sizes_and_disjointness():
    rows = list(range(100))
    train, held = train_eval_split(rows, 0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(train + held) == rows
    assert train_eval_split(rows, 0.1, seed=3) == (train, held)
    assert train_eval_split(rows, 0.1, seed=4)[1] != held
    assert train_eval_split([1, 2, 3], 0.01, seed=0)[1] != []  # a positive fraction holds out >= 1 row
    assert train_eval_split(rows, 0.0)[1] == []
    with pytest.raises(DataError, match=r"data\.eval_fraction=1"):
        train_eval_split(rows, 1)


def test_blend_without_weights_is_concatenation():
    assert blend([[1, 2], [3]]) == [1, 2, 3]


def test_blend_weights_set_the_shares():
    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(10)]
    out = blend([a, b], weights=[3, 1], seed=0, total=40)
    counts = Counter(x[0] for x in out)
    assert counts == {"a": 30, "b": 10}
    assert len(set(x for x in out if x[0] == "a")) == 30  # subsampled without replacement
    # default total = summed sizes (110): shares 82.5 / 27.5 floor to 82 / 27; the tied remainder row goes
    # to the lower index, so a gets 83 (no repeats) and b 27 = 2 full copies + 7 sampled rows
    out = blend([a, b], weights=[3, 1], seed=0)
    counts = Counter(out)
    assert len(out) == 110
    assert sorted(counts[x] for x in a) == [0] * 17 + [1] * 83
    assert sorted(counts[x] for x in b) == [2] * 3 + [3] * 7
    assert blend([a, b], weights=[3, 1], seed=0) == out
    assert blend([a, b], weights=[3, 1], seed=1) != out


def test_blend_rejects_bad_weights():
    with pytest.raises(DataError, match=r"data\.weights has 1 values for 2"):
        blend([[1], [2]], weights=[1])
    with pytest.raises(DataError, match="non-negative"):
        blend([[1], [2]], weights=[1, -1])
    with pytest.raises(DataError, match="dataset 1 is empty"):
        blend([[1], []], weights=[1, 1], total=4)


def _write_pairs(path, n, tag):
    rows = [{"prompt": f"{tag} q{i}", "chosen": "good", "rejected": "bad"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prepare_records_phases_are_disjoint_across_kinds(tmp_path):
    src = _write_pairs(tmp_path / "pairs.jsonl", 50, "x")
    sft, _ = prepare_records(src, kind="sft", phase=1, data_split="2,4,4")
    rm, _ = prepare_records(src, kind="preference", phase=2, data_split="2,4,4")
    ppo, _ = prepare_records(src, kind="prompt", phase=3, data_split="2,4,4")
    rows = [{r["_row"] for r in part} for part in (sft, rm, ppo)]
    assert [len(r) for r in rows] == [10, 20, 20]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "good"}
    assert "prompt" in ppo[0] and "chosen" not in ppo[0]


def test_prepare_records_holds_out_eval_and_blends(tmp_path):
    a = _write_pairs(tmp_path / "a.jsonl", 40, "a")
    b = _write_pairs(tmp_path / "b.jsonl", 10, "b")
    train, held = prepare_records([a, b], weights=[1, 1], kind="preference", eval_fraction=0.1, seed=5)
    assert len(held) == 5  # 4 from a + 1 from b
    assert {r["_row"] for r in held if r["_source"] == a}.isdisjoint(
        {r["_row"] for r in train if r["_source"] == a})
    # 36 + 9 = 45 rows blended half/half: 22.5 each, the tied remainder row goes to the first source
    assert Counter(r["_source"] for r in train) == {a: 23, b: 22}


def test_prepare_records_eval_sources(tmp_path):
    a = _write_pairs(tmp_path / "a.jsonl", 5, "a")
    ev = _write_pairs(tmp_path / "ev.jsonl", 3, "e")
    train, held = prepare_records(a, kind="preference", eval_sources=[ev], eval_fraction=0.2)
    assert (len(train), len(held)) == (5, 3)  # nothing held out of training when eval sources are given
    assert {r["_source"] for r in held} == {ev}


def test_prepare_records_reads_a_data_config(tmp_path):
    src = _write_pairs(tmp_path / "pairs.jsonl", 50, "x")

    class Data:  # the fields of config.DataConfig that prepare_records reads
        datasets, weights, format, data_split, seed = [src], None, "auto", "2,4,4", 1234
        eval_fraction, eval_datasets = 0.1, []

    train, held = prepare_records(Data, kind="preference", phase=2)
    direct = prepare_records(src, kind="preference", phase=2, data_split="2,4,4", eval_fraction=0.1)
    assert (len(train), len(held)) == (18, 2)
    assert (train, held) == direct


def test_prepare_records_empty_phase_names_the_flag(tmp_path):
    src = _write_pairs(tmp_path / "few.jsonl", 2, "f")
    with pytest.raises(DataError, match=r"no training rows for phase 1 from .*few.jsonl.*data\.data_split"):
        prepare_records(src, kind="sft", phase=1, data_split="2,4,4")
