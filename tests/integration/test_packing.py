"""Padding-free (packed) forwards equal the padded ones, stage by stage, in fp32: the same losses step after
step and the same weights at the end, with the tiny model's pad == eos tokenizer, with LoRA, and on 2 processes
under ZeRO-3. Token-budget micro-batches (--engine.max_tokens_per_micro_batch) equal micro_batch_size rows the
same way, on 1 process and on 2 under ZeRO-2 and -3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_data import copy_rows, train_rows, write_jsonl

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
LAUNCHER = Path(sys.executable).with_name("deepspeed")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packing")
    rows = copy_rows(96)
    for k, row in enumerate(rows):  # lengths from 1 to ~40 words: micro-batches with a lot of padding
        row["response"] = " ".join([row["response"]] * (1 + k % 7))
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": " ".join(r["response"].split()[::-1]) + " no"}
             for r in rows[:80]]
    return {"model": str(build_tiny_llama(root / "model")), "sft": write_jsonl(root / "sft.jsonl", rows),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs)}


def sft(x: dict, out: Path, *extra: str, world: int = 1) -> Path:
    argv = ["sft", "--model.name_or_path", x["model"], "--data.datasets", f"[{x['sft']}]", "--data.data_split",
            "1,0,0", "--data.eval_fraction", "0.1", "--run.output_dir", str(out), "--run.progress", "false",
            "--run.precision", "fp32", "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", str(8 // world),
            "--engine.adam_eps", "1e-6", *extra]
    if world == 1:
        assert main(argv) == 0
        return out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(LAUNCHER), "--num_gpus", str(world), "--no_local_rank", "--module", "chatrlhf.cli", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def same_run(a: Path, b: Path, weights: str = "model.safetensors") -> None:
    ra, rb = train_rows(a), train_rows(b)
    assert sorted(ra) == sorted(rb) and len(ra) > 0
    for step in ra:
        assert rb[step]["train/loss"] == pytest.approx(ra[step]["train/loss"], rel=1e-5), step
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    assert eb["loss"] == pytest.approx(ea["loss"], rel=1e-5) and eb["tokens"] == ea["tokens"]
    wa, wb = load_file(a / "model" / weights), load_file(b / "model" / weights)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_sft_packed_equals_padded_over_20_steps(inputs, tmp_path):
    padded = sft(inputs, tmp_path / "padded", "--engine.packing", "false", "--max_steps", "20")
    packed = sft(inputs, tmp_path / "packed", "--max_steps", "20")
    same_run(padded, packed)
    losses = [r["train/loss"] for r in train_rows(packed).values()]
    assert losses[-1] < 0.7 * losses[0]  # a real run: it learns
    # the packed forwards ran on far fewer padding positions
    pad = [r["train/pad_frac"] for r in train_rows(padded).values()]
    packed_pad = [r["train/pad_frac"] for r in train_rows(packed).values()]
    assert sum(packed_pad) < 0.5 * sum(pad) and min(pad) > 0.2, (pad, packed_pad)


def test_sft_lora_packed_equals_padded(inputs, tmp_path):
    lora = ["--model.lora_r", "4", "--max_steps", "6"]
    same_run(sft(inputs, tmp_path / "padded", "--engine.packing", "false", *lora), sft(inputs, tmp_path / "packed", *lora))


@pytest.mark.skipif(not LAUNCHER.exists(), reason="needs the deepspeed launcher")
def test_sft_packed_on_two_processes_zero3_equals_padded_on_one(inputs, tmp_path):
    steps = ["--max_steps", "4"]
    padded = sft(inputs, tmp_path / "padded", "--engine.packing", "false", *steps)
    packed = sft(inputs, tmp_path / "packed", "--engine.zero_stage", "3", *steps, world=2)
    same_run(padded, packed)


BUDGET = ["--engine.micro_batch_size", "4", "--engine.gradient_accumulation_steps", "2", "--max_steps", "10"]


@pytest.mark.parametrize("packing", ["true", "false"])
def test_sft_token_budget_equals_row_micro_batches(inputs, tmp_path, packing):
    """16 rows per step, as 2 micro-batches of 8 or as many as a 300-position budget needs (1 to 5)."""
    rows = sft(inputs, tmp_path / "rows", "--engine.packing", packing, *BUDGET)
    budget = sft(inputs, tmp_path / "budget", "--engine.packing", packing, *BUDGET,
                 "--engine.max_tokens_per_micro_batch", "300")
    same_run(rows, budget)
    counts = [r["train/micro_batches"] for r in train_rows(budget).values()]
    assert {r["train/micro_batches"] for r in train_rows(rows).values()} == {2}
    assert len(set(counts)) > 1, counts  # the budget cut the steps differently


@pytest.mark.skipif(not LAUNCHER.exists(), reason="needs the deepspeed launcher")
@pytest.mark.parametrize("zero", ["2", "3"])
def test_sft_token_budget_on_two_processes_equals_rows_on_one(inputs, tmp_path, zero):
    """Each process's rows cut by the budget, the counts evened out across processes (ZeRO's collectives)."""
    steps = ["--engine.micro_batch_size", "8", "--max_steps", "4"]
    rows = sft(inputs, tmp_path / "rows", *steps)
    budget = sft(inputs, tmp_path / "budget", "--engine.zero_stage", zero, "--engine.max_tokens_per_micro_batch",
                 "120", "--max_steps", "4", world=2)  # 4 rows a process
    same_run(rows, budget)
    assert min(r["train/micro_batches"] for r in train_rows(budget).values()) > 1  # the budget cut the 4 rows


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_pair_stages_token_budget_equals_row_micro_batches(inputs, tmp_path, stage):
    """The reward model, DPO and KTO with 8 rows per step as 2 micro-batches or under a 200-position budget."""
    ref_key = "train/accuracy" if stage == "rm" else "train/logps/chosen" if stage == "dpo" else "train/loss"
    runs = {}
    for name, extra in (("rows", []), ("budget", ["--engine.max_tokens_per_micro_batch", "200"])):
        argv = preference_args(inputs, tmp_path / name, stage, "--engine.gradient_accumulation_steps", "2", *extra)
        if stage == "rm":
            argv[argv.index("--engine.learning_rate") + 1] = "1e-3"
        assert main(argv) == 0
        runs[name] = train_rows(tmp_path / name)
    for step in runs["rows"]:
        for key in ("train/loss", ref_key):
            assert runs["budget"][step][key] == pytest.approx(runs["rows"][step][key], rel=1e-5), (step, key)
    wa = load_file(tmp_path / "rows" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "budget" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def preference_args(x: dict, out: Path, stage: str, *extra: str) -> list[str]:
    return [stage, "--model.name_or_path", x["model"], "--data.datasets", f"[{x['pairs']}]", "--data.data_split",
            "0,1,0", "--data.eval_fraction", "0.2", "--run.output_dir", str(out), "--run.progress", "false",
            "--run.precision", "fp32", "--engine.learning_rate", "1e-3", "--engine.micro_batch_size", "4",
            "--engine.adam_eps", "1e-6", "--max_steps", "6", *extra]


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_preference_stages_packed_equal_padded(inputs, tmp_path, stage):
    """DPO (its reference precomputed over 20 steps, then per micro-batch), KTO and the reward model (20 steps):
    losses, rewards and weights."""
    runs = {"dpo": (["--max_steps", "20"], ["--precompute_reference", "false"]), "kto": ([],),
            "rm": (["--max_steps", "20"],)}
    for n, extra in enumerate(runs[stage]):
        padded, packed = tmp_path / f"padded{n}", tmp_path / f"packed{n}"
        assert main(preference_args(inputs, padded, stage, "--engine.packing", "false", *extra)) == 0
        assert main(preference_args(inputs, packed, stage, *extra)) == 0
        ra, rb = train_rows(padded), train_rows(packed)
        keys = ["train/loss"] + [k for k in ra[1] if k.startswith(("train/logps/", "train/accuracy"))]
        for step in ra:
            for key in keys:
                assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-5), (step, key)
        wa, wb = load_file(padded / "model" / "model.safetensors"), load_file(packed / "model" / "model.safetensors")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


REWARD = "def short_yes(prompt, response, metadata):\n    return min(response.split().count('yes'), 3) - 0.02 * len(response)\n"


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_scoring_and_update_packed_equal_padded(inputs, tmp_path, stage):
    """The same rollouts (the generation is not packed) scored and trained packed or padded: old/reference
    log-probs, values, KL, losses and the actor's (and critic's) weights agree."""
    (tmp_path / "reward.py").write_text(REWARD)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w} {v}"} for w in "abcdefgh" for v in "xy"])
    argv = [stage, "--model.name_or_path", inputs["model"], "--data.datasets", f"[{prompts}]", "--data.data_split",
            "0,0,1", "--reward", f"{tmp_path / 'reward.py'}:short_yes", "--run.progress", "false", "--gold_every",
            "0", "--run.precision", "fp32", "--generation.max_new_tokens", "16", "--max_iterations", "3",
            "--actor_engine.learning_rate", "1e-3", "--actor_engine.adam_eps", "1e-6", "--rollout_batch_size", "8",
            "--actor_engine.micro_batch_size", "4", "--generation.backend", "native"]
    if stage == "ppo":
        argv += ["--critic_engine.learning_rate", "1e-3", "--critic_engine.micro_batch_size", "4", "--ppo_epochs", "2",
                 "--critic_engine.adam_eps", "1e-6"]
    else:
        argv += ["--samples_per_prompt", "2", "--ppo_epochs", "2"]
    padded, packed, budget = tmp_path / "padded", tmp_path / "packed", tmp_path / "budget"
    engines = ("actor_engine", "critic_engine") if stage == "ppo" else ("actor_engine",)
    assert main([*argv, "--run.output_dir", str(padded), *(a for e in engines for a in (f"--{e}.packing", "false"))]) == 0
    assert main([*argv, "--run.output_dir", str(packed)]) == 0
    # the same rollouts scored and trained in micro-batches of at most 60 packed tokens instead of 4 rows
    assert main([*argv, "--run.output_dir", str(budget),
                 *(a for e in engines for a in (f"--{e}.max_tokens_per_micro_batch", "60"))]) == 0
    ra = train_rows(padded)
    keys = [k for k in ra[1] if k.split("/")[1] in ("kl", "loss", "reward", "value", "values", "ratio_first")]
    assert any("loss" in k for k in keys) and any("kl" in k for k in keys)
    for other in (packed, budget):
        rb = train_rows(other)
        assert sorted(ra) == sorted(rb) == [1, 2, 3]
        for step in ra:
            for key in keys:
                assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-4, abs=1e-5), (other.name, step, key)
        for name in ("model", "critic") if stage == "ppo" else ("model",):
            wa, wb = load_file(padded / name / "model.safetensors"), load_file(other / name / "model.safetensors")
            for k in wa:
                torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
