"""Feedback database -> ``chatrlhf export`` -> reward model / DPO, and ``chatrlhf train --feedback``, on a
tiny random Llama. The feedback is systematic (a polite answer beats a rude one), so the reward model
must learn it, not just run."""

import itertools
import json
import random
import sqlite3
from pathlib import Path

import pytest

from chatrlhf.cli import main
from chatrlhf.feedback.store import FeedbackStore
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
WORDS = "the quick brown fox jumps over lazy dog hello world question".split()
N_PROMPTS = 24
PAIRS = N_PROMPTS - 1  # prompt 0: the two annotators disagree, in comparisons and in ratings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def feedback_db(tmp_path_factory) -> Path:
    """24 prompts, each with a polite answer (``... good answer thanks``) and a rude one (``no bad ...``);
    annotators ann and bob compare every pair (bob sees the sides swapped on odd prompts) and rate every
    answer. On prompt 0 they disagree both ways, so it yields no pair."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("feedback") / "feedback.db"
    store = FeedbackStore(path)
    prompts = [f"question {i}: {' '.join(rng.choice(WORDS) for _ in range(3))}?" for i in range(N_PROMPTS)]
    store.add_prompts([[{"role": "user", "content": q}] for q in prompts], source="prompts.jsonl")
    request_ids = (f"request-{i:06d}" for i in itertools.count())
    for i, q in enumerate(prompts):
        pid = store.prompt_id_for([{"role": "user", "content": q}])
        stem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        polite = store.add_answer(pid, "policy", f"yes {stem} good answer thanks", True, {}, slot="a")
        rude = store.add_answer(pid, "policy", f"no {stem} bad", True, {}, slot="b")
        for who in ("ann", "bob"):
            disagree = i == 0 and who == "bob"
            swapped = who == "bob" and i % 2 == 1
            first, second = (rude, polite) if swapped else (polite, rude)
            choice = ("b" if swapped else "a") if not disagree else ("a" if swapped else "b")
            store.add_comparison(next(request_ids), pid, first, second, choice, who)
            for answer, score in ((polite, 1 if disagree else 5), (rude, 5 if disagree else 1 + (who == "bob"))):
                scores = {"overall": score, "consistency": 3, "engagingness": 3, "safety": 3, "relevance": 3}
                store.add_rating(next(request_ids), answer, scores, who)
    return path


def test_export_then_reward_model_learns_and_dpo_runs(feedback_db, tiny_model, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--db", str(feedback_db), "--output_dir", str(out)]) == 0
    summary = json.loads((out / "export.json").read_text())
    # kto: both answers of every prompt but the disputed one (means 5 and 1.5); prompt 0's answers average 3
    assert summary["counts"] == {"comparisons": 2 * N_PROMPTS, "ratings": 4 * N_PROMPTS, "pairs": PAIRS,
                                 "kto": 2 * PAIRS}
    assert summary["stats"]["merged"] == PAIRS and summary["stats"]["comparisons"]["dropped_tie"] == 1
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"].endswith("good answer thanks") and p["rejected"].startswith("no ") for p in pairs)

    data = ["--model.name_or_path", tiny_model, "--data.datasets", f"[{out / 'pairs.jsonl'}]",
            "--data.data_split", "0,1,0", "--data.eval_fraction", "0.25", "--run.progress", "false"]
    rm = tmp_path / "rm"
    assert main(["rm", *data, "--run.output_dir", str(rm), "--engine.learning_rate", "2e-3",
                 "--engine.micro_batch_size", "6", "--engine.warmup_steps", "0", "--epochs", "6"]) == 0
    ev = json.loads((rm / "eval.json").read_text())
    start = ev["start"]  # the same held-out pairs, scored by the untrained model
    assert ev["loss"] < 0.5 * start["loss"] and ev["accuracy"] == 1.0, (start, ev)
    assert ev["chosen_score"] - ev["rejected_score"] > start["chosen_score"] - start["rejected_score"] + 1.0

    dpo = tmp_path / "dpo"
    assert main(["dpo", *data, "--run.output_dir", str(dpo), "--max_steps", "2", "--engine.micro_batch_size", "4",
                 "--engine.gradient_accumulation_steps", "1"]) == 0
    assert (dpo / "model" / "config.json").is_file() and json.loads((dpo / "eval.json").read_text())

    # the ratings, unpaired, train KTO: polite answers desirable, rude ones undesirable
    kto = tmp_path / "kto"
    assert main(["kto", *data, "--data.datasets", f"[{out / 'kto.jsonl'}]", "--run.output_dir", str(kto),
                 "--engine.learning_rate", "1e-3", "--engine.warmup_steps", "0", "--max_steps", "12",
                 "--engine.micro_batch_size", "8", "--engine.gradient_accumulation_steps", "1"]) == 0
    ev = json.loads((kto / "eval.json").read_text())
    assert ev["answers"] == 12 and ev["rewards/margin"] > ev["start"]["rewards/margin"] + 0.2, ev


def test_train_feedback_trains_the_rm_on_exactly_the_exported_pairs(feedback_db, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHATRLHF_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "feedback.db"  # a copy: this test adds feedback to it
    with sqlite3.connect(feedback_db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    out = tmp_path / "run"
    flags = ["train", "--preset", "smoke", "--run.output_dir", str(out), "--run.progress", "false",
             "--eval.enabled", "false", "--ppo.max_iterations", "1", "--feedback.db", str(db)]
    assert main(flags) == 0
    assert f"-> {PAIRS} pairs -> {out / 'feedback'}" in capsys.readouterr().out
    exported = out / "feedback" / "pairs.jsonl"
    assert len(exported.read_text().splitlines()) == PAIRS
    rm_cfg = (out / "rm" / "config.yaml").read_text()
    assert str(exported) in rm_cfg and "0,1,0" in rm_cfg
    data = next(json.loads(line) for line in (out / "rm" / "metrics.jsonl").read_text().splitlines()
                if "data/records" in line)
    assert data["data/records"] + data["data/eval_records"] == PAIRS  # the RM saw the export, nothing else
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert str(exported) not in sft_cfg  # SFT still trains on data.datasets (the demo)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feedback"] == {"comparisons": 2 * N_PROMPTS, "ratings": 4 * N_PROMPTS, "pairs": PAIRS,
                                   "kto": 2 * PAIRS}
    assert {"sft", "rm", "ppo"} <= set(summary)

    # --resume reuses the export the run trained on, even if feedback arrived since
    store = FeedbackStore(db)
    store.add_prompts([[{"role": "user", "content": "a late question?"}]], source="late")
    pid = store.prompt_id_for([{"role": "user", "content": "a late question?"}])
    answers = [store.add_answer(pid, "policy", text, True, {}, slot=slot) for slot, text in (("a", "yes"), ("b", "no"))]
    store.add_comparison("late-request-1", pid, *answers, "a", "ann")
    before = exported.read_text()
    assert main([*flags, "--run.resume", "true"]) == 0
    assert "reused (resume)" in capsys.readouterr().out and exported.read_text() == before
    # a missing database stops before anything runs, naming the flag
    assert main([*flags[:-1], str(tmp_path / "typo.db")]) == 2
    assert "--feedback.db" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()
