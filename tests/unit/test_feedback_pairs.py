"""Ratings -> preference pairs: each filter, the stats, the output file and the ``chatrlhf pairs`` command."""

import json

import pytest

from chatrlhf.cli import main
from chatrlhf.config import ConfigError, DataConfig
from chatrlhf.data.feedback import PairsConfig, annotator_agreement, make_pairs, ratings_to_pairs
from chatrlhf.data.formats import DataError, normalise_rows
from chatrlhf.data.sources import load_records
from chatrlhf.data.split import prepare_records

Q = "2+2?"


def ratings(*rows, prompt=Q):
    """(response, score[, annotator]) tuples -> rating records, as the data layer normalises them."""
    raw = [{"prompt": prompt, "response": r[0], "score": r[1], **({"annotator": r[2]} if len(r) > 2 else {})}
           for r in rows]
    records, kind = normalise_rows(list(enumerate(raw, start=1)), "ratings.jsonl", fmt="rating")
    assert kind == "rating"
    return records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_of(pairs):
    return [(p["chosen"], p["rejected"]) for p in pairs]


# ---------------------------------------------------------------------------------------------- the pure function
def test_worked_example_from_docstring():
    records = ratings(("4", 5, "a"), ("4", 4, "b"), (" 4 ", 5, "c"), ("5", 1, "a"), ("5", 5, "b"), ("four", 4.5, "c"))
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=1.0)
    assert stats == {"ratings": 6, "prompts": 1, "answers": 3, "duplicates_merged": 3, "single_answer_prompts": 0,
                     "candidate_pairs": 3, "dropped_tie": 1, "dropped_disagreement": 1, "no_shared_annotator": 1,
                     "pairs": 1}
    assert pairs == [{"prompt": [{"role": "user", "content": Q}], "chosen": "four", "rejected": "5", "margin": 1.5,
                      "agreement": None, "n_chosen": 1, "n_rejected": 2, "n_shared": 0}]
    # a majority is enough at 0.5: ("4", "5") comes back, first in order (answers in first-seen order)
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=0.5)
    assert pair_of(pairs) == [("4", "5"), ("four", "5")]
    assert pairs[0]["agreement"] == 0.5 and pairs[0]["n_shared"] == 2
    assert pairs[0]["margin"] == pytest.approx(14 / 3 - 3, abs=1e-9)  # (5+4+5)/3 - (1+5)/2
    assert (pairs[0]["n_chosen"], pairs[0]["n_rejected"]) == (3, 2)
    assert stats["dropped_disagreement"] == 0 and stats["pairs"] == 2


def test_exact_tie_is_dropped_even_with_zero_margin():
    pairs, stats = ratings_to_pairs(ratings(("A", 3), ("B", 4), ("B", 2)), min_margin=0.0, min_agreement=1.0)
    # A: 3; B: (4 + 2) / 2 = 3 -> tie
    assert pairs == [] and stats["dropped_tie"] == 1 and stats["candidate_pairs"] == 1


@pytest.mark.parametrize("min_margin, kept", [(1.0, False), (0.5, True), (0.51, False), (0.0, True)])
def test_near_tie_against_margin(min_margin, kept):
    # means 4 and 3.5: margin 0.5, which exactly meets min_margin=0.5
    pairs, stats = ratings_to_pairs(ratings(("A", 4), ("B", 3.5)), min_margin=min_margin, min_agreement=1.0)
    assert (len(pairs), stats["dropped_tie"]) == ((1, 0) if kept else (0, 1))


def test_decimal_scores_meet_the_margin_despite_float_error():
    assert 4.1 - 3.1 < 1.0  # the float difference falls short of 1 by ~4e-16
    pairs, _ = ratings_to_pairs(ratings(("A", 4.1), ("B", 3.1)), min_margin=1.0, min_agreement=1.0)
    assert pair_of(pairs) == [("A", "B")] and pairs[0]["margin"] == 1.0


def test_whitespace_duplicates_merge_and_pool_scores():
    records = ratings(("Paris is nice.", 5), (" Paris  is\nnice. ", 2), ("Paris is nice.", 5), ("Rome.", 1))
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=1.0)
    # "Paris is nice." pools 5, 2, 5 -> mean 4, first spelling kept; Rome 1 -> margin 3
    assert pairs == [{"prompt": [{"role": "user", "content": Q}], "chosen": "Paris is nice.", "rejected": "Rome.",
                      "margin": 3.0, "agreement": None, "n_chosen": 3, "n_rejected": 1, "n_shared": 0}]
    assert (stats["answers"], stats["duplicates_merged"]) == (2, 2)


def test_case_or_punctuation_differences_stay_distinct_answers():
    _, stats = ratings_to_pairs(ratings(("Paris.", 5), ("paris.", 1), ("Paris", 3)), 1.0, 1.0)
    assert stats["answers"] == 3 and stats["duplicates_merged"] == 0 and stats["candidate_pairs"] == 3


@pytest.mark.parametrize("min_agreement, kept", [(1.0, False), (0.67, False), (2 / 3, True), (0.5, True)])
def test_disagreement_share_against_min_agreement(min_agreement, kept):
    # A mean 14/3, B mean 2: a and b agree (A > B), c disagrees -> agreement 2/3
    records = ratings(("A", 5, "a"), ("A", 5, "b"), ("A", 4, "c"), ("B", 1, "a"), ("B", 1, "b"), ("B", 4.5, "c"))
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=min_agreement)
    assert (len(pairs), stats["dropped_disagreement"]) == ((1, 0) if kept else (0, 1))
    if kept:
        assert pairs[0]["agreement"] == pytest.approx(2 / 3, rel=1e-12) and pairs[0]["n_shared"] == 3


def test_annotator_tie_counts_as_not_agreeing():
    # a: 5 vs 1 agrees; b: 3 vs 3 ties -> 1/2
    records = ratings(("A", 5, "a"), ("A", 3, "b"), ("B", 1, "a"), ("B", 3, "b"))
    assert ratings_to_pairs(records, 1.0, 1.0)[1]["dropped_disagreement"] == 1
    pairs, _ = ratings_to_pairs(records, 1.0, 0.5)
    assert pairs[0]["agreement"] == 0.5


def test_annotators_without_overlap_do_not_count():
    # only a rated both (agrees); b rated only A low and c only B high: they would "disagree" but do not count
    records = ratings(("A", 5, "a"), ("A", 4, "b"), ("B", 1, "a"), ("B", 3, "c"), ("B", 2))
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=1.0)
    assert pair_of(pairs) == [("A", "B")]
    assert (pairs[0]["agreement"], pairs[0]["n_shared"]) == (1.0, 1)
    assert stats["no_shared_annotator"] == 0


def test_annotator_agreement_hand_example():
    # a agrees (5 > 1), b disagrees (4 < 5), c ties (3 vs mean(2, 4) = 3), d rated only high: 1 of 3
    high, low = {"a": [5.0], "b": [4.0], "c": [3.0], "d": [5.0]}, {"a": [1.0], "b": [5.0], "c": [2.0, 4.0]}
    share, shared = annotator_agreement(high, low)
    assert shared == 3 and share == pytest.approx(1 / 3, rel=1e-12)
    assert annotator_agreement({"a": [5.0]}, {"b": [1.0]}) == (None, 0)
    assert annotator_agreement({"a": [5.0, 1.0]}, {"a": [2.0]}) == (1.0, 1)  # a's mean 3 > 2


def test_annotator_ids_compare_as_text_and_repeat_ratings_average():
    # 7 (int) and "7" (CSV text) are one person; their two ratings of A average to 3.5 > B's 3 -> agrees
    records = ratings(("A", 5, 7), ("A", 2, "7"), ("B", 3, 7), ("C", 1, "x"))
    pairs, _ = ratings_to_pairs(records, min_margin=0.5, min_agreement=1.0)
    a_b = next(p for p in pairs if {p["chosen"], p["rejected"]} == {"A", "B"})
    assert (a_b["chosen"], a_b["agreement"], a_b["n_shared"]) == ("A", 1.0, 1)


def test_chosen_is_the_higher_mean_whatever_the_input_order():
    pairs, _ = ratings_to_pairs(ratings(("worse", 1), ("better", 4)), min_margin=1.0, min_agreement=1.0)
    assert pair_of(pairs) == [("better", "worse")] and pairs[0]["margin"] == 3.0


def test_prompts_group_separately_and_single_answer_prompts_give_no_pair():
    records = (ratings(("A", 5), ("B", 1), prompt="p1") + ratings(("only", 5), prompt="p2")
               + ratings(("C", 1), prompt=[{"role": "user", "content": "p1"}]))  # same prompt as "p1"
    pairs, stats = ratings_to_pairs(records, min_margin=1.0, min_agreement=1.0)
    assert pair_of(pairs) == [("A", "B"), ("A", "C")]  # B and C both score 1: a tie
    assert (stats["prompts"], stats["single_answer_prompts"], stats["candidate_pairs"], stats["dropped_tie"]) == \
        (2, 1, 3, 1)


def test_order_is_deterministic_and_stats_add_up():
    records = ratings(("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))
    first = ratings_to_pairs(records, 1.0, 1.0)
    assert ratings_to_pairs(list(records), 1.0, 1.0) == first
    pairs, stats = first
    assert pair_of(pairs) == [("b", "a"), ("c", "a"), ("d", "a"), ("e", "a"), ("c", "b"), ("d", "b"), ("e", "b"),
                              ("d", "c"), ("e", "c"), ("e", "d")]
    assert stats["candidate_pairs"] == 10 == stats["dropped_tie"] + stats["dropped_disagreement"] + stats["pairs"]


def test_bad_annotator_names_the_row_and_field():
    records = ratings(("A", 5, "a"), ("B", 1, ["a"]))
    with pytest.raises(DataError) as err:
        ratings_to_pairs(records, 1.0, 1.0)
    assert "ratings.jsonl line 2, field 'annotator'" in str(err.value)


# ---------------------------------------------------------------------------------------------- make_pairs / CLI
RATING_ROWS = [
    {"prompt": Q, "response": "4", "score": 5, "annotator": "a"},
    {"prompt": Q, "response": "5", "score": 1, "annotator": "a"},
    {"prompt": Q, "response": "4 ", "score": 4, "annotator": "b"},
    {"prompt": Q, "response": "5", "score": 2, "annotator": "b"},
    {"prompt": "capital of France?", "response": "Paris.", "score": 3},
    {"prompt": "capital of France?", "response": "Rome.", "score": 3},
]


def test_make_pairs_writes_preference_file_that_loads_back(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ratings.jsonl", RATING_ROWS)
    out = tmp_path / "sub" / "pairs.jsonl"
    stats = make_pairs(PairsConfig(input=[str(src)], output=str(out)))
    assert (stats["ratings"], stats["prompts"], stats["duplicates_merged"], stats["dropped_tie"], stats["pairs"]) \
        == (6, 2, 2, 1, 1)
    assert "ratings=6 prompts=2" in capsys.readouterr().out
    records, kind = load_records(str(out))  # format auto-detected
    assert kind == "preference" and len(records) == 1
    assert (records[0]["chosen"], records[0]["rejected"]) == ("4", "5")
    assert records[0]["meta"] == {"margin": 3.0, "agreement": 1.0, "n_chosen": 2, "n_rejected": 2, "n_shared": 2}
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed away
    # what `chatrlhf rm --data.datasets OUT --data.data_split 0,1,0` reads
    train, _ = prepare_records(DataConfig(datasets=[str(out)], data_split="0,1,0", eval_fraction=0.0),
                               kind="preference", phase=2)
    assert [(r["chosen"], r["rejected"]) for r in train] == [("4", "5")]


def test_make_pairs_reads_csv_with_text_annotators_and_blank_ones(tmp_path):
    src = tmp_path / "ratings.csv"
    # annotator 7 vs 3 disagree on A/B; the anonymous rating (blank cell) only moves the mean
    src.write_text("prompt,response,score,annotator\nq,A,5,7\nq,B,1,7\nq,A,2,3\nq,B,4,3\nq,A,5,\n",
                   encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(DataError, match="dropped_disagreement=1"):
        make_pairs(PairsConfig(input=[str(src)], output=str(out)))
    stats = make_pairs(PairsConfig(input=[str(src)], output=str(out), min_agreement=0.5))
    row = json.loads(out.read_text())
    # A: (5 + 2 + 5) / 3 = 4, B: (1 + 4) / 2 = 2.5
    assert (row["chosen"], row["margin"], row["agreement"], row["n_shared"]) == ("A", 1.5, 0.5, 2)
    assert stats["pairs"] == 1


def test_make_pairs_refuses_to_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "ratings.jsonl", RATING_ROWS)
    out = tmp_path / "pairs.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(ConfigError, match=r"pairs\.jsonl already exists.*--overwrite true"):
        make_pairs(PairsConfig(input=[str(src)], output=str(out)))
    assert out.read_text() == "keep me\n"
    make_pairs(PairsConfig(input=[str(src)], output=str(out), overwrite=True))
    assert json.loads(out.read_text().splitlines()[0])["chosen"] == "4"


def test_make_pairs_bad_row_names_file_row_and_field(tmp_path):
    src = write_jsonl(tmp_path / "ratings.jsonl", [*RATING_ROWS[:2], {"prompt": Q, "response": "4", "score": "high"}])
    with pytest.raises(DataError, match=r"ratings\.jsonl line 3, field 'score'"):
        make_pairs(PairsConfig(input=[str(src)], output=str(tmp_path / "pairs.jsonl")))
    missing = write_jsonl(tmp_path / "noscore.jsonl", [{"prompt": Q, "response": "4"}])
    with pytest.raises(DataError, match=r"noscore\.jsonl line 1, field 'score'"):
        make_pairs(PairsConfig(input=[str(missing)], output=str(tmp_path / "pairs.jsonl")))
    assert not (tmp_path / "pairs.jsonl").exists()


def test_make_pairs_with_nothing_left_says_which_flag_to_lower(tmp_path):
    src = write_jsonl(tmp_path / "ratings.jsonl", RATING_ROWS[4:])  # one tie only
    with pytest.raises(DataError, match=r"no pair survived.*dropped_tie=1.*--min_margin"):
        make_pairs(PairsConfig(input=[str(src)], output=str(tmp_path / "pairs.jsonl")))
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("kwargs, flag", [({"input": []}, "--input"), ({"min_margin": -1.0}, "--min_margin"),
                                          ({"min_agreement": 1.5}, "--min_agreement")])
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        PairsConfig(**{"input": ["r.jsonl"], **kwargs}).validate()


def test_cli_pairs(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ratings.jsonl", RATING_ROWS)
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--input", f"[{src}]", "--output", str(out), "--min_agreement", "0.5"]) == 0
    assert load_records(str(out))[1] == "preference"
    assert main(["pairs", "--input", f"[{src}]", "--output", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite true" in capsys.readouterr().err


def test_ratings_to_labels_worked_example():
    from chatrlhf.data.feedback import ratings_to_labels

    q = [{"role": "user", "content": "2+2?"}]
    records = [{"prompt": q, "response": "4", "score": 5}, {"prompt": q, "response": " 4 ", "score": 4},
               {"prompt": q, "response": "5", "score": 1}, {"prompt": q, "response": "four", "score": 3}]
    rows, stats = ratings_to_labels(records, desirable_min=4, undesirable_max=2)
    assert rows == [{"prompt": q, "response": "4", "label": True, "mean_score": 4.5, "n_ratings": 2},
                    {"prompt": q, "response": "5", "label": False, "mean_score": 1.0, "n_ratings": 1}]
    assert stats == {"ratings": 4, "answers": 3, "desirable": 1, "undesirable": 1, "dropped_neutral": 1}
    # the thresholds are inclusive: 3 is desirable at desirable_min 3
    assert [r["label"] for r in ratings_to_labels(records, 3, 2)[0]] == [True, False, True]
