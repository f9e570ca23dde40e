"""Feedback database -> training data: comparison votes, the merge with ratings, the exported files and
``chatrlhf train --feedback``'s stage configs."""

import itertools
import json

import pytest

from chatrlhf.config import ConfigError
from chatrlhf.data.feedback import ratings_to_pairs
from chatrlhf.data.formats import DataError
from chatrlhf.data.sources import load_records
from chatrlhf.feedback.export import (
    COMPARISON_STAT_KEYS,
    FILES,
    ExportConfig,
    comparison_agreement,
    comparisons_to_pairs,
    export_feedback,
    feedback_to_pairs,
    rating_record,
    run_export,
)
from chatrlhf.feedback.store import FeedbackStore
from chatrlhf.pipeline_config import FeedbackSection, PipelineConfig, PipelineRunConfig

Q = "2+2?"
PROMPT = [{"role": "user", "content": Q}]


def votes(*rows, prompt=Q):
    """(annotator, answer_a, answer_b, choice) tuples -> comparison rows as FeedbackStore.comparison_rows gives."""
    return [{"id": i, "prompt": [{"role": "user", "content": prompt}], "annotator": who, "answer_a": a,
             "answer_b": b, "choice": choice} for i, (who, a, b, choice) in enumerate(rows, start=1)]


def rated(*rows, prompt=Q):
    """(annotator, response, overall) tuples -> rating rows as FeedbackStore.rating_rows gives."""
    return [{"id": i, "prompt": [{"role": "user", "content": prompt}], "annotator": who, "response": text,
             "overall": score, "consistency": 3, "engagingness": 3, "safety": 3, "relevance": 3, "model": "m",
             "finished": 1, "comment": ""} for i, (who, text, score) in enumerate(rows, start=1)]


def pair_of(pairs):
    return [(p["chosen"], p["rejected"]) for p in pairs]


# ------------------------------------------------------------------------------------ comparisons_to_pairs
WORKED = votes(("ann", "4", "5", "b"), ("bob", "5", " 4", "b"), ("cy", "4", "four", "tie"), ("ann", "4", "four", "a"),
               ("bob", "four", "4", "a"), ("ann", "4", "4 ", "a"), ("ann", "5", "4", "b"), ("ann", "5", "four", "b"),
               ("bob", "four", "5", "a"), ("cy", "5", "four", "a"))


def test_worked_example_from_docstring():
    pairs, stats = comparisons_to_pairs(WORKED, min_agreement=1.0)
    assert stats == {"comparisons": 10, "superseded": 1, "candidate_pairs": 4, "dropped_identical": 1,
                     "dropped_tie": 1, "dropped_disagreement": 1, "pairs": 1}
    assert pairs == [{"prompt": PROMPT, "chosen": "4", "rejected": "5", "votes": 2, "agreement": 1.0,
                      "source": "comparisons"}]
    # 2 of 3 votes for "four" is enough at 0.5; pairs stay in first-seen order
    pairs, stats = comparisons_to_pairs(WORKED, min_agreement=0.5)
    assert pair_of(pairs) == [("4", "5"), ("four", "5")]
    assert pairs[1]["votes"] == 3 and pairs[1]["agreement"] == pytest.approx(2 / 3, abs=1e-12)
    assert stats["dropped_disagreement"] == 0 and stats["pairs"] == 2
    assert stats["candidate_pairs"] == sum(stats[k] for k in ("dropped_identical", "dropped_tie",
                                                              "dropped_disagreement", "pairs"))


def test_equal_wins_and_all_tie_votes_are_ties():
    split = votes(("ann", "x", "y", "a"), ("bob", "x", "y", "b"))  # 1-1
    all_ties = votes(("ann", "x", "y", "tie"), ("bob", "y", "x", "tie"))  # 0-0
    for rows in (split, all_ties):
        pairs, stats = comparisons_to_pairs(rows, min_agreement=0.0)
        assert pairs == [] and stats["dropped_tie"] == 1 and stats["candidate_pairs"] == 1


@pytest.mark.parametrize("min_agreement, kept", [(1.0, False), (0.67, False), (2 / 3, True), (0.6666666666, True),
                                                 (0.5, True)])
def test_agreement_two_of_three_against_threshold(min_agreement, kept):
    # x wins 2 of 3 votes: agreement 2/3 (0.6666666666 is within the 1e-9 tolerance, 0.67 is not)
    rows = votes(("ann", "x", "y", "a"), ("bob", "y", "x", "b"), ("cy", "x", "y", "b"))
    pairs, stats = comparisons_to_pairs(rows, min_agreement)
    assert stats["dropped_disagreement"] == (not kept) and len(pairs) == kept
    if kept:
        assert pair_of(pairs) == [("x", "y")] and pairs[0]["votes"] == 3


def test_a_tie_vote_counts_as_not_agreeing():
    # x: 2 wins, 1 tie vote -> 2/3, as a dissent would be; without the tie voter it is 2/2
    pairs, _ = comparisons_to_pairs(votes(("ann", "x", "y", "a"), ("bob", "x", "y", "a"), ("cy", "x", "y", "tie")), 0.5)
    assert pairs[0]["agreement"] == pytest.approx(2 / 3, abs=1e-12) and pairs[0]["votes"] == 3
    pairs, stats = comparisons_to_pairs(votes(("ann", "x", "y", "a"), ("bob", "x", "y", "a"), ("cy", "x", "y", "tie")), 1.0)
    assert pairs == [] and stats["dropped_disagreement"] == 1


def test_identical_answers_after_whitespace_normalisation_are_dropped():
    rows = votes(("ann", "Paris is  the capital.", " Paris is the capital.\n", "a"))
    pairs, stats = comparisons_to_pairs(rows, 0.0)
    assert pairs == [] and stats["dropped_identical"] == 1 and stats["candidate_pairs"] == 1


def test_latest_vote_of_an_annotator_replaces_the_earlier_ones():
    # ann first prefers y, then x (shown swapped), then x again; bob x: x wins 2-0 with 2 votes, not 3-1 of 4
    rows = votes(("ann", "x", "y", "b"), ("ann", "y", "x", "b"), ("bob", "x", "y", "a"), ("ann", "x", "y", "a"))
    pairs, stats = comparisons_to_pairs(rows, 1.0)
    assert pair_of(pairs) == [("x", "y")] and pairs[0]["votes"] == 2 and pairs[0]["agreement"] == 1.0
    assert stats["superseded"] == 2 and stats["comparisons"] == 4
    # the order decides: ann's last vote for y makes it 1-1, a tie
    pairs, stats = comparisons_to_pairs(rows[:3] + votes(("ann", "x", "y", "b")), 1.0)
    assert pairs == [] and stats["dropped_tie"] == 1


def test_whitespace_variants_merge_and_the_first_spelling_is_written():
    rows = votes(("ann", "Paris  is big", "Rome", "a"), ("bob", "Rome ", " Paris is big", "b"))
    pairs, stats = comparisons_to_pairs(rows, 1.0)
    assert pair_of(pairs) == [("Paris  is big", "Rome")] and pairs[0]["votes"] == 2
    assert stats["candidate_pairs"] == 1


def test_sides_swapped_across_annotators_are_one_pair():
    # (x, y) shown to ann and bob, (y, x) to cy and dee: every one of them prefers x
    rows = votes(("ann", "x", "y", "a"), ("bob", "x", "y", "a"), ("cy", "y", "x", "b"), ("dee", "y", "x", "b"))
    pairs, stats = comparisons_to_pairs(rows, 1.0)
    assert pair_of(pairs) == [("x", "y")] and pairs[0]["votes"] == 4 and stats["candidate_pairs"] == 1
    # ... and if cy and dee pick their side "a" (which is y), it is 2-2: a tie
    rows = votes(("ann", "x", "y", "a"), ("bob", "x", "y", "a"), ("cy", "y", "x", "a"), ("dee", "y", "x", "a"))
    assert comparisons_to_pairs(rows, 0.0)[1]["dropped_tie"] == 1


def test_prompts_are_kept_apart_and_a_bad_choice_names_the_row():
    rows = votes(("ann", "x", "y", "a")) + votes(("ann", "x", "y", "b"), prompt="other")
    pairs, stats = comparisons_to_pairs(rows, 1.0)
    assert pair_of(pairs) == [("x", "y"), ("y", "x")] and stats["candidate_pairs"] == 2
    with pytest.raises(DataError, match="comparison 1 has choice 'c'"):
        comparisons_to_pairs(votes(("ann", "x", "y", "c")), 1.0)


# ------------------------------------------------------------------------------------ the merge with ratings
def test_merge_same_direction_conflict_and_single_source_pairs():
    comparisons = votes(("ann", "4", "5", "a"), ("ann", "four", "5", "a"), ("ann", "IV", "5", "a"))
    # ratings by one annotator: 4 -> 5, four -> 2, 5 -> 3, V -> 1: pairs 4>5, 4>four, 4>V, 5>four, 5>V, four>V
    ratings = rated(("bob", " 4", 5), ("bob", "four", 2), ("bob", "5", 3), ("bob", "V", 1))
    pairs, stats = feedback_to_pairs(comparisons, ratings, min_margin=1.0, min_agreement=1.0)
    assert {k: stats[k] for k in ("comparison_pairs", "rating_pairs", "merged", "dropped_conflict", "pairs")} == \
        {"comparison_pairs": 3, "rating_pairs": 6, "merged": 1, "dropped_conflict": 1, "pairs": 6}
    assert stats["pairs"] == 3 + 6 - 1 - 2 * 1
    # ("4", "5") from both, same direction: the comparison row, both sources noted, the ratings' margin added
    assert pairs[0] == {"prompt": PROMPT, "chosen": "4", "rejected": "5", "votes": 1, "agreement": 1.0,
                        "source": "comparisons+ratings", "margin": 2.0}
    # ("four", "5"): the comparison says four, the ratings say 5 -> both dropped; ("IV", "5"): comparisons only
    assert pair_of(pairs) == [("4", "5"), ("IV", "5"), (" 4", "four"), (" 4", "V"), ("four", "V"), ("5", "V")]
    assert [p["source"] for p in pairs] == ["comparisons+ratings", "comparisons"] + ["ratings"] * 4
    assert pairs[2]["margin"] == 3.0 and pairs[2]["n_shared"] == 1
    assert stats["comparisons"]["pairs"] == 3 and stats["ratings"]["pairs"] == 6


def test_ratings_use_overall_as_the_score_through_ratings_to_pairs():
    ratings = rated(("ann", "good", 5), ("bob", "good", 4), ("ann", "bad", 2), ("bob", "bad", 4))
    expected, _ = ratings_to_pairs([rating_record(r) for r in ratings], 1.0, 0.5)
    pairs, stats = feedback_to_pairs([], ratings, min_margin=1.0, min_agreement=0.5)
    # good 4.5 vs bad 3: margin 1.5; ann agrees, bob ties -> agreement 1/2
    assert pairs == [{**expected[0], "source": "ratings"}] and pairs[0]["agreement"] == 0.5
    assert feedback_to_pairs([], ratings, min_margin=1.0, min_agreement=1.0)[1]["ratings"]["dropped_disagreement"] == 1
    assert stats["comparisons"] == dict.fromkeys(COMPARISON_STAT_KEYS, 0)


# ------------------------------------------------------------------------------------ export_feedback on a real db
_request_ids = (f"request-{i:06d}" for i in itertools.count())


def build_db(path, items, comparisons=(), ratings=()):
    """items: {prompt: (answer a, answer b)}; comparisons: (prompt, annotator, choice, swapped);
    ratings: (prompt, slot, annotator, overall). Returns the store."""
    store = FeedbackStore(path)
    store.add_prompts([[{"role": "user", "content": q}] for q in items], source="test.jsonl")
    ids = {}
    for q, (a, b) in items.items():
        pid = store.prompt_id_for([{"role": "user", "content": q}])
        ids[q] = (pid, {"a": store.add_answer(pid, "model-a", a, True, {"seed": 1}, slot="a"),
                        "b": store.add_answer(pid, "model-b", b, False, {"seed": 2}, slot="b")})
    for q, who, choice, swapped in comparisons:
        pid, answers = ids[q]
        first, second = ("b", "a") if swapped else ("a", "b")
        store.add_comparison(next(_request_ids), pid, answers[first], answers[second], choice, who, comment="c")
    for q, slot, who, overall in ratings:
        scores = {"overall": overall, "consistency": 4, "engagingness": 3, "safety": 5, "relevance": 2}
        store.add_rating(next(_request_ids), ids[q][1][slot], scores, who, comment="r")
    return store


ITEMS = {"hi?": ("Hello! How can I help?", "Go away."), "2+2?": ("4", "5"), "sky?": ("Blue.", "Green.")}
COMPARISONS = [("hi?", "ann", "a", False), ("hi?", "bob", "b", True),  # both for the helpful answer
               ("2+2?", "ann", "a", False), ("2+2?", "bob", "b", False),  # 1-1: tie
               ("sky?", "ann", "tie", False)]
RATINGS = [("hi?", "a", "ann", 5), ("hi?", "b", "ann", 1), ("sky?", "a", "bob", 5), ("sky?", "b", "bob", 2)]


def test_export_writes_the_four_files_and_training_reads_them(tmp_path, capsys):
    db = tmp_path / "feedback.db"
    build_db(db, ITEMS, COMPARISONS, RATINGS)
    out = tmp_path / "export"
    summary = run_export(ExportConfig(db=str(db), output_dir=str(out), min_margin=1.0, min_agreement=1.0))
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp file left behind
    line = capsys.readouterr().out
    assert line.startswith("[chatrlhf] export: 5 comparisons, 4 ratings -> 2 pairs (") and line.rstrip().endswith(str(out))
    assert "), 4 labelled answers -> " in line

    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    hi, sky = [{"role": "user", "content": "hi?"}], [{"role": "user", "content": "sky?"}]
    assert pairs == [
        {"prompt": hi, "chosen": "Hello! How can I help?", "rejected": "Go away.", "votes": 2, "agreement": 1.0,
         "source": "comparisons+ratings", "margin": 4.0},
        # sky: the comparison was a tie; bob rated both answers (5 > 2), so the ratings give the pair
        {"prompt": sky, "chosen": "Blue.", "rejected": "Green.", "margin": 3.0, "agreement": 1.0, "n_chosen": 1,
         "n_rejected": 1, "n_shared": 1, "source": "ratings"},
    ]
    records, kind = load_records(str(out / "pairs.jsonl"))
    assert kind == "preference" and [(r["chosen"], r["rejected"]) for r in records] == pair_of(pairs)
    assert records[0]["meta"]["source"] == "comparisons+ratings"

    ratings = [json.loads(x) for x in (out / "ratings.jsonl").read_text().splitlines()]
    assert ratings[0] == {"prompt": hi, "response": "Hello! How can I help?", "score": 5, "annotator": "ann",
                          "consistency": 4, "engagingness": 3, "safety": 5, "relevance": 2, "model": "model-a",
                          "finished": True, "comment": "r"}
    assert [(r["response"], r["score"], r["model"], r["finished"]) for r in ratings[1:]] == [
        ("Go away.", 1, "model-b", False), ("Blue.", 5, "model-a", True), ("Green.", 2, "model-b", False)]
    records, kind = load_records(str(out / "ratings.jsonl"), fmt="rating")
    assert kind == "rating" and [r["score"] for r in records] == [5.0, 1.0, 5.0, 2.0]

    comparisons = [json.loads(x) for x in (out / "comparisons.jsonl").read_text().splitlines()]
    assert [(c["annotator"], c["answer_a"], c["answer_b"], c["choice"]) for c in comparisons] == [
        ("ann", "Hello! How can I help?", "Go away.", "a"), ("bob", "Go away.", "Hello! How can I help?", "b"),
        ("ann", "4", "5", "a"), ("bob", "4", "5", "b"), ("ann", "Blue.", "Green.", "tie")]
    assert comparisons[1]["model_a"] == "model-b" and comparisons[0]["comment"] == "c"
    assert comparisons[0]["prompt"] == hi

    written = json.loads((out / "export.json").read_text())
    assert written == summary
    assert written["counts"] == {"comparisons": 5, "ratings": 4, "pairs": 2, "kto": 4}
    assert written["settings"] == {"min_margin": 1.0, "min_agreement": 1.0, "kto_desirable_min": 4.0,
                                   "kto_undesirable_max": 2.0} and written["db"] == str(db.resolve())
    assert written["stats"]["comparisons"] == {"comparisons": 5, "superseded": 0, "candidate_pairs": 3,
                                               "dropped_identical": 0, "dropped_tie": 2, "dropped_disagreement": 0,
                                               "pairs": 1}
    assert (written["stats"]["merged"], written["stats"]["dropped_conflict"]) == (1, 0)

    # kto.jsonl: each rated answer with its mean overall score, 5 -> desirable, 1 and 2 -> undesirable (<= 2)
    kto = [json.loads(x) for x in (out / "kto.jsonl").read_text().splitlines()]
    assert [(r["response"], r["label"], r["mean_score"]) for r in kto] == [
        ("Hello! How can I help?", True, 5), ("Go away.", False, 1), ("Blue.", True, 5), ("Green.", False, 2)]
    records, kind = load_records(str(out / "kto.jsonl"))
    assert kind == "unpaired" and [r["label"] for r in records] == [True, False, True, False]
    assert written["stats"]["kto"] == {"ratings": 4, "answers": 4, "desirable": 2, "undesirable": 2,
                                       "dropped_neutral": 0}


def test_export_refuses_to_overwrite_and_a_missing_db(tmp_path):
    db = tmp_path / "feedback.db"
    build_db(db, ITEMS, COMPARISONS, RATINGS)
    out = tmp_path / "export"
    export_feedback(db, out, 1.0, 1.0, overwrite=False)
    before = (out / "pairs.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"pairs\.jsonl.*--overwrite true"):
        export_feedback(db, out, 0.0, 0.0, overwrite=False)
    assert (out / "pairs.jsonl").read_text() == before
    export_feedback(db, out, 1.0, 0.5, overwrite=True)
    assert json.loads((out / "export.json").read_text())["settings"]["min_agreement"] == 0.5

    missing = tmp_path / "typo.db"
    with pytest.raises(ConfigError, match="--db .*typo.db does not exist"):
        export_feedback(missing, tmp_path / "other", 1.0, 1.0, overwrite=False)
    assert not missing.exists() and not (tmp_path / "other").exists()  # no empty database, no files
    with pytest.raises(ConfigError, match="is a directory"):
        export_feedback(tmp_path, tmp_path / "other", 1.0, 1.0, overwrite=False)


def test_no_surviving_pair_writes_the_files_then_raises(tmp_path):
    db = tmp_path / "feedback.db"
    build_db(db, {"2+2?": ("4", "5")}, [("2+2?", "ann", "a", False), ("2+2?", "bob", "b", False)],
             [("2+2?", "a", "ann", 4), ("2+2?", "b", "ann", 4)])
    out = tmp_path / "export"
    with pytest.raises(DataError, match=r"no preference pair survived.*dropped_tie=1.*lower --min_margin or "
                                        r"--min_agreement"):
        export_feedback(db, out, 1.0, 1.0, overwrite=False)
    assert (out / "pairs.jsonl").read_text() == ""
    assert len((out / "ratings.jsonl").read_text().splitlines()) == 2
    assert len((out / "comparisons.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "export.json").read_text())["counts"] == {"comparisons": 2, "ratings": 2, "pairs": 0,
                                                                        "kto": 2}
    empty = tmp_path / "empty.db"
    FeedbackStore(empty)
    with pytest.raises(DataError, match="holds no comparisons or ratings yet"):
        export_feedback(empty, tmp_path / "e", 1.0, 1.0, overwrite=False)


# ------------------------------------------------------------------------------------ chatrlhf train --feedback
def test_pipeline_feedback_gives_the_rm_and_dpo_stages_the_exported_pairs(tmp_path):
    db = tmp_path / "feedback.db"
    FeedbackStore(db)
    cfg = PipelineConfig(run=PipelineRunConfig(output_dir=f"{tmp_path / 'run'}/"), feedback=FeedbackSection(db=str(db)))
    cfg.data.datasets, cfg.data.weights, cfg.data.eval_fraction = ["demo", "extra.jsonl"], [1.0, 2.0], 0.2
    cfg.validate()
    sft, rm = cfg.stage_configs()
    pairs = f"{tmp_path / 'run'}/feedback/pairs.jsonl"
    assert sft.data.datasets == ["demo", "extra.jsonl"] and sft.data.data_split == "2,4,4"
    assert (rm.data.datasets, rm.data.data_split, rm.data.weights, rm.data.format) == ([pairs], "0,1,0", None,
                                                                                       "preference")
    assert rm.data.eval_fraction == 0.2 and rm.data.max_len == cfg.data.max_len and rm.phase == 2
    cfg.algo = "dpo"
    dpo = cfg.rl_config()
    assert (dpo.data.datasets, dpo.data.data_split, dpo.phase) == ([pairs], "0,1,0", 2)
    cfg.algo = "ppo"
    assert cfg.rl_config().data.datasets == ["demo:prompts_train"]  # RL prompts are not the pairs
    # without --feedback nothing changes
    plain = PipelineConfig(run=PipelineRunConfig(output_dir=str(tmp_path / "run")))
    assert plain.stage_configs()[1].data is plain.data


def test_pipeline_feedback_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="--feedback.db .*nope.db does not exist"):
        PipelineConfig(feedback=FeedbackSection(db=str(tmp_path / "nope.db"))).validate()
    with pytest.raises(ConfigError, match="--feedback.min_agreement"):
        PipelineConfig(feedback=FeedbackSection(min_agreement=1.5)).validate()
    assert not (tmp_path / "nope.db").exists()


# ------------------------------------------------------------------------------------ per-prompt agreement
def test_agreement_table_worked_example_from_docstring():
    pairs, _ = comparisons_to_pairs(WORKED, min_agreement=1.0)
    table, total = comparison_agreement(WORKED, pairs, min_agreement=1.0)
    assert total == 3
    assert [(r["a"], r["b"], r["tie"], r["annotators"], r["verdict"], r["chosen"]) for r in table] == [
        (1, 1, 1, 3, "tie", None),             # {"4", "four"}: "4" shown first
        (1, 2, 0, 3, "disagreement", None),    # {"5", "four"}: "5" shown first, "four" leads 2 of 3
        (2, 0, 0, 2, "kept", "a")]             # {"4", "5"}: ann's latest vote and bob's
    assert [r["agreement"] for r in table] == pytest.approx([1 / 3, 2 / 3, 1.0], rel=1e-12)
    assert {r["prompt"] for r in table} == {Q}
    # 2/3 passes 0.6: the same rule (and tolerance) as the export's
    pairs, _ = comparisons_to_pairs(WORKED, min_agreement=0.6)
    assert [r["verdict"] for r in comparison_agreement(WORKED, pairs, min_agreement=0.6)[0]] == ["tie", "kept", "kept"]
    assert comparison_agreement(WORKED, pairs, min_agreement=0.6, limit=1)[0][0]["verdict"] == "tie"


def test_agreement_table_order_limit_and_single_voter_pairs():
    """q1 1-1 (0.5, tie); q2 2 A + 1 tie (2/3, kept at 0.6); q3 2 B (1.0, kept, B); q4 one annotator (left out)."""
    rows = (votes(("ann", "x", "y", "a"), ("bob", "x", "y", "b"), prompt="q1")
            + votes(("ann", "x", "y", "a"), ("bob", "y", "x", "b"), ("cy", "x", "y", "tie"), prompt="q2")
            + votes(("ann", "x", "y", "b"), ("bob", "x", "y", "b"), prompt="q3")
            + votes(("ann", "x", "y", "a"), prompt="q4"))
    pairs, _ = comparisons_to_pairs(rows, min_agreement=0.6)
    table, total = comparison_agreement(rows, pairs, min_agreement=0.6, limit=2)
    assert total == 3
    assert [(r["prompt"], r["a"], r["b"], r["tie"], r["verdict"], r["chosen"]) for r in table] == [
        ("q1", 1, 1, 0, "tie", None), ("q2", 2, 0, 1, "kept", "a")]
    assert comparison_agreement(rows, pairs, 0.6)[0][2]["prompt"] == "q3"
    assert comparison_agreement(rows, pairs, 0.6)[0][2]["chosen"] == "b"


def test_agreement_table_marks_a_pair_the_ratings_overturn_and_shortens_the_prompt():
    """Both annotators prefer "4"; the ratings prefer "5" (5 vs 1): the merge drops the pair as a conflict."""
    long = "Please " + "explain this " * 10 + "now"  # 137 characters
    comparisons = votes(("ann", "4", "5", "a"), ("bob", "5", "4", "b"), prompt=long)
    ratings = rated(("cy", "5", 5), ("cy", "4", 1), prompt=long)
    pairs, stats = feedback_to_pairs(comparisons, ratings, min_margin=1.0, min_agreement=1.0)
    assert pairs == [] and stats["dropped_conflict"] == 1
    [row], total = comparison_agreement(comparisons, pairs, min_agreement=1.0)
    assert (row["verdict"], row["chosen"], row["a"], row["b"], row["agreement"], total) == ("conflict", "a", 2, 0, 1.0, 1)
    assert row["prompt"] == long[:79] + "\u2026" and len(row["prompt"]) == 80
    # without the ratings the same votes are kept
    pairs, _ = feedback_to_pairs(comparisons, [], min_margin=1.0, min_agreement=1.0)
    assert comparison_agreement(comparisons, pairs, min_agreement=1.0)[0][0]["verdict"] == "kept"


# ------------------------------------------------------------------------------------ undone judgements
def test_undone_judgements_are_in_no_exported_file(tmp_path):
    """build_db's comparisons 1-5 and ratings 1-4; bob undoes his last comparison (4: "2+2?" b) and his
    last rating (4: "sky?" b = 2). By hand: "2+2?" is now ann's "4" alone -> kept (1 vote); "sky?" has one
    rated answer left -> no rating pair; "hi?" is kept by both sources as before -> 2 pairs, 4 comparisons,
    3 ratings, 3 labelled answers (5, 1, 5)."""
    db = tmp_path / "feedback.db"
    store = build_db(db, ITEMS, COMPARISONS, RATINGS)
    assert store.undo_last("undo-00001", "bob", "comparison").id == 4
    assert store.undo_last("undo-00002", "bob", "rating").id == 4
    summary = export_feedback(db, tmp_path / "export", 1.0, 1.0, overwrite=False)
    read = lambda name: [json.loads(x) for x in (tmp_path / "export" / name).read_text().splitlines()]  # noqa: E731
    hi, sums = [{"role": "user", "content": "hi?"}], [{"role": "user", "content": "2+2?"}]
    assert read("pairs.jsonl") == [
        {"prompt": hi, "chosen": "Hello! How can I help?", "rejected": "Go away.", "votes": 2, "agreement": 1.0,
         "source": "comparisons+ratings", "margin": 4.0},
        {"prompt": sums, "chosen": "4", "rejected": "5", "votes": 1, "agreement": 1.0, "source": "comparisons"}]
    assert [(c["id"], c["annotator"], c["choice"]) for c in read("comparisons.jsonl")] == [
        (1, "ann", "a"), (2, "bob", "b"), (3, "ann", "a"), (5, "ann", "tie")]
    assert [(r["response"], r["score"]) for r in read("ratings.jsonl")] == [
        ("Hello! How can I help?", 5), ("Go away.", 1), ("Blue.", 5)]
    assert [r["mean_score"] for r in read("kto.jsonl")] == [5, 1, 5]
    assert summary["counts"] == {"comparisons": 4, "ratings": 3, "pairs": 2, "kto": 3}
    assert summary["stats"]["comparisons"] == {"comparisons": 4, "superseded": 0, "candidate_pairs": 3,
                                               "dropped_identical": 0, "dropped_tie": 1, "dropped_disagreement": 0,
                                               "pairs": 2}
