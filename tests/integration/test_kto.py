"""The KTO stage on a tiny random Llama: it learns from unpaired labels, micro-batch x accumulation equals the
full batch (z0 is one value per optimizer step), and its data and flags are checked."""

import json
from pathlib import Path

import pytest
import torch
from test_dpo import metric, preference_rows

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kto")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(160)))
    # the same answers unpaired, as `chatrlhf export` writes them: labels as JSON booleans and as 1/0
    unpaired = root / "unpaired.jsonl"
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen" if k % 2 else int(side == "chosen")}
            for k, r in enumerate(preference_rows(80, seed=1)) for side in ("chosen", "rejected")]
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(build_tiny_llama(root / "model", seed=0)), "pairs": str(pairs), "unpaired": str(unpaired)}


def run_kto(x: dict, data: str, out: Path, *extra: str) -> Path:
    flags = [
        "--model.name_or_path", x["model"], "--data.datasets", f"[{data}]", "--data.data_split", "0,1,0",
        "--data.eval_fraction", "0.2", "--run.output_dir", str(out), "--run.progress", "false",
        "--engine.learning_rate", "1e-3", "--engine.warmup_steps", "0", "--engine.gradient_accumulation_steps", "1",
    ]  # fmt: skip
    assert main(["kto", *flags, *extra]) == 0
    return out


@pytest.mark.parametrize("source", ["pairs", "unpaired"])
def test_kto_learns_desirable_over_undesirable(inputs, tmp_path, source):
    out = run_kto(inputs, inputs[source], tmp_path / "kto", "--engine.micro_batch_size", "8", "--max_steps", "30")
    losses = metric(out, "train/loss")
    assert len(losses) == 30
    assert losses[0] == pytest.approx(0.5, rel=1e-6)  # policy == reference: r = z0 = 0, 1 - sigmoid(0)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    ev = json.loads((out / "eval.json").read_text())
    # pairs: 32 held-out pairs give 64 answers, half of them desirable; unpaired: 32 of the 160 answers held out
    assert ev["stage"] == "kto" and ev["answers"] == (64 if source == "pairs" else 32)
    assert ev["desirable_frac"] == 0.5 if source == "pairs" else 0.2 < ev["desirable_frac"] < 0.8
    # r and z0 are 0 up to float rounding (the reference scored the rows in a batch of another width)
    assert ev["start"]["loss"] == pytest.approx(0.5, rel=1e-6) and ev["start"]["kl"] == pytest.approx(0, abs=1e-5)
    # held-out answers: desirable ones rose above the undesirable ones, relative to the reference
    assert ev["rewards/margin"] > 0.3 and ev["loss"] < 0.47, ev
    assert ev["kl"] > 0  # the policy moved away from the reference on mismatched pairs too


def test_accumulation_equals_the_full_batch(inputs, tmp_path):
    adam = ["--engine.adam_eps", "1e-6"]  # see test_dpo.py: eps 1e-8 would turn rounding noise into a step
    small = run_kto(inputs, inputs["pairs"], tmp_path / "2x2", "--engine.micro_batch_size", "2",
                    "--engine.gradient_accumulation_steps", "2", "--max_steps", "4", "--run.eval_at_start", "false",
                    "--run.precision", "fp32", *adam)
    full = run_kto(inputs, inputs["pairs"], tmp_path / "4x1", "--engine.micro_batch_size", "4", "--max_steps", "4",
                   "--run.eval_at_start", "false", "--run.precision", "fp32", *adam)
    torch.testing.assert_close(torch.tensor(metric(small, "train/loss")), torch.tensor(metric(full, "train/loss")),
                               rtol=1e-5, atol=0)
    # kl and the margin are differences of summed answer log-probs (~ -60, float32): their rounding, which
    # differs with the micro-batches' shapes, is ~1e-6 absolute (at step 1 kl is 0 up to it)
    for key in ("train/kl", "train/rewards/margin"):
        torch.testing.assert_close(torch.tensor(metric(small, key)), torch.tensor(metric(full, key)), rtol=1e-4,
                                   atol=1e-5)
    assert metric(full, "train/kl")[-1] > 0  # z0 is in play, and the same in both runs
    from safetensors.torch import load_file

    a, b = load_file(small / "model" / "model.safetensors"), load_file(full / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_inputs_name_the_flag_or_row(inputs, tmp_path, capsys):
    base = ["kto", "--model.name_or_path", inputs["model"], "--run.output_dir", str(tmp_path / "o"), "--run.progress",
            "false", "--data.data_split", "0,1,0"]
    assert main([*base, "--data.datasets", f"[{inputs['pairs']}]", "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err
    assert main([*base, "--data.datasets", f"[{inputs['pairs']}]", "--undesirable_weight", "-1"]) == 2
    assert "--undesirable_weight must be a finite number > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "completion": "yes", "label": "maybe"}) + "\n")
    assert main([*base, "--data.datasets", f"[{bad}]"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 1" in err and "label must be true" in err
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "hi", "completion": "yes"}) + "\n")
    assert main([*base, "--data.datasets", f"[{sft}]"]) == 2
    assert "cannot be turned into unpaired records" in capsys.readouterr().err
