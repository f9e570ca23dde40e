"""End-to-end stage runs on a tiny random Llama: SFT learns, the RM separates, the CLI reads YAML then flags."""

import json
import random
from pathlib import Path

import pytest
from tiny_data import WORDS, copy_rows, write_jsonl

from chatrlhf.cli import main, parse
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


def metrics(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def common_flags(model: str, data: str, out: Path, split: str = "1,0,0") -> list[str]:
    return [
        "--model.name_or_path", model,
        "--data.datasets", f"[{data}]",
        "--data.data_split", split,
        "--run.output_dir", str(out),
        "--run.progress", "false",
    ]  # fmt: skip


def test_sft_loss_falls_on_copy_task(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "copy.jsonl", copy_rows(160))
    out = tmp_path / "sft"
    flags = common_flags(tiny_model, data, out) + [
        "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", "8", "--engine.warmup_steps", "0",
        "--max_steps", "60",
    ]  # fmt: skip
    assert main(["sft", *flags]) == 0
    losses = metrics(out, "train/loss")
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["loss"] < 0.5 * losses[0], (ev, losses[0])  # held-out copies, not just the training batches
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers loads the result
    assert (out / "config.yaml").exists() and any((out / "tensorboard").iterdir())


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable by construction: the chosen answer contains 'good', the rejected one 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        stem = [rng.choice(WORDS[:8]) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(stem))
        good, bad = stem[:at] + ["good"] + stem[at:], stem[:at] + ["bad"] + stem[at:]
        rows.append({"prompt": f"question {' '.join(stem)}", "chosen": " ".join(good), "rejected": " ".join(bad)})
    return rows


def test_reward_model_separates_synthetic_preferences(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(400))
    out = tmp_path / "rm"
    flags = common_flags(tiny_model, data, out, split="0,1,0") + [
        "--engine.learning_rate", "2e-3", "--engine.micro_batch_size", "16", "--engine.warmup_steps", "0",
        "--epochs", "3", "--data.eval_fraction", "0.2",
    ]  # fmt: skip
    assert main(["rm", *flags]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["accuracy"] >= 0.9, ev
    assert ev["chosen_score"] > ev["rejected_score"]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out / "model")


def test_ratings_model_learns(tiny_model, tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(300):
        level = rng.randint(1, 5)
        rows.append({"prompt": "rate me", "response": " ".join(["good"] * level + ["dog"] * (5 - level)), "score": level})
    data = write_jsonl(tmp_path / "ratings.jsonl", rows)
    out = tmp_path / "ratings"
    flags = common_flags(tiny_model, data, out, split="0,1,0") + [
        "--objective", "ratings", "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", "16",
        "--engine.warmup_steps", "0", "--epochs", "4", "--data.eval_fraction", "0.2",
    ]  # fmt: skip
    assert main(["rm", *flags]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["accuracy"] >= 0.6 and ev["mae"] < 0.6, ev  # chance accuracy is 0.2


def test_refuses_to_overwrite_a_finished_model(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "copy.jsonl", copy_rows(16))
    out = tmp_path / "sft"
    flags = common_flags(tiny_model, data, out) + ["--engine.micro_batch_size", "4", "--max_steps", "1"]
    assert main(["sft", *flags]) == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    assert main(["sft", *flags]) == 2
    assert "--run.overwrite" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_cli_yaml_config_then_flag_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("engine:\n  learning_rate: 0.001\n  micro_batch_size: 3\nepochs: 5\n")
    _, cfg = parse(["sft", "--config", str(cfg_file), "--engine.micro_batch_size", "7", "--local_rank=0"])
    assert (cfg.engine.learning_rate, cfg.engine.micro_batch_size, cfg.epochs) == (0.001, 7, 5)
    assert cfg.model.trust_remote_code is False
