"""The non-finite guard inside a real SFT run. A fault is injected into the loss (the token NLL of chosen
micro-batches becomes NaN): a poisoned step is skipped, counted and logged with its step, and the run goes
on; NaN at every step stops the run after ``engine.max_consecutive_nonfinite`` skips in a row, with one
clear line, exit status 1, and the model of an earlier run left intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chatrlhf.stages.sft as sft
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    words = "the quick brown fox jumps over lazy dog".split()
    rows = [{"prompt": f"copy: {words[i % 8]} {words[3 * i % 8]}", "response": f"{words[i % 8]} {words[3 * i % 8]}"}
            for i in range(40)]
    (root / "copy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(build_tiny_llama(root / "model")), str(root / "copy.jsonl")


def sft_flags(setup, out: Path, *extra: str) -> list[str]:
    model, data = setup
    return ["sft", "--model.name_or_path", model, "--data.datasets", f"[{data}]", "--data.data_split", "1,0,0",
            "--run.output_dir", str(out), "--run.progress", "false", "--run.eval_at_start", "false",
            "--engine.micro_batch_size", "4", "--engine.gradient_accumulation_steps", "2",
            "--engine.learning_rate", "1e-3", "--max_steps", "5", *extra]


def poison(monkeypatch, calls: set[int] | None) -> None:
    """The NLL of the given training forward calls (1-based; every call when None) becomes NaN."""
    real, count = sft.forward_nll, [0]

    def nll(engine, batch, packing):
        count[0] += 1
        out, mask = real(engine, batch, packing)
        return (out * float("nan"), mask) if calls is None or count[0] in calls else (out, mask)

    monkeypatch.setattr(sft, "forward_nll", nll)


def train_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def test_a_poisoned_step_is_skipped_and_the_run_goes_on(setup, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {4})  # the second micro-batch of optimizer step 2
    out = tmp_path / "run"
    assert main(sft_flags(setup, out)) == 0
    rows = train_rows(out)
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1, 1, 1]
    assert rows[1]["train/loss"] != rows[1]["train/loss"]  # the NaN is logged as it was
    assert all(r["train/loss"] == r["train/loss"] for r in rows[2:]), rows  # and the weights stayed finite
    log = capsys.readouterr().out
    assert "optimizer step 2 skipped: non-finite loss" in log and "1 in a row, 1 in all" in log
    assert all(torch.isfinite(w).all() for w in load_file(out / "model" / "model.safetensors").values())


def test_nan_at_every_step_stops_the_run_and_keeps_the_earlier_model(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(sft_flags(setup, out, "--max_steps", "2")) == 0
    model_before = (out / "model" / "model.safetensors").read_bytes()
    poison(monkeypatch, None)
    flags = sft_flags(setup, out, "--run.overwrite", "true", "--engine.max_consecutive_nonfinite", "3")
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert "stopping at optimizer step 3: 3 steps in a row had a NaN/inf loss or gradient" in err
    assert "engine.max_consecutive_nonfinite" in err and "Traceback" not in err
    assert (out / "model" / "model.safetensors").read_bytes() == model_before
