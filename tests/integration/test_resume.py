"""Exact resume, stage by stage: N steps, a checkpoint, then N more steps in a fresh process equal 2N
uninterrupted steps bit for bit (every logged training metric, grad norms included, and the final
weights), on one process and on two under ZeRO-2. The resumed run starts from a copy of the
uninterrupted run's step-N checkpoint, which is what a run killed right after that save leaves behind.

The stages run with their stateful options on: gradient accumulation, an epoch boundary at the checkpoint
(SFT), the adaptive KL controller, reward normalisation, the EMA actor and PPO-ptx (PPO), an ensemble
reward with per-source normalisers and KL in the loss (GRPO); DAPO's dynamic sampling with reward
normalisation (grpo-dynamic), whose further rounds draw their prompts and answers from stateless seeds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_data import WORDS, train_rows, write_jsonl

from chatrlhf.checkpoint import latest_checkpoint
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
LAUNCHER = Path(sys.executable).with_name("deepspeed")
needs_launcher = pytest.mark.skipif(not LAUNCHER.exists(), reason="needs the deepspeed launcher")
REWARD_FN = '''
def short_yes(prompt, response, metadata):
    return min(response.split().count("yes"), 3) - 0.02 * len(response)


def half_flat(prompt, response, metadata):
    """By length after "say the/quick/brown/fox/jumps", else 0 for every answer: all-equal groups."""
    return len(response) / 10 if prompt.split()[1] in ("the", "quick", "brown", "fox", "jumps") else 0.0
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    copy = []
    for _ in range(32):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        copy.append({"prompt": f"copy: {text}", "response": text})
    pairs = []
    for _ in range(64):
        stem = [rng.choice(WORDS[:8]) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(stem))
        pairs.append({"prompt": f"question {' '.join(stem)}", "chosen": " ".join(stem[:at] + ["good"] + stem[at:]),
                      "rejected": " ".join(stem[:at] + ["bad"] + stem[at:])})
    prompts = [{"prompt": f"say {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}"} for i in range(64)]
    ratings = [{"prompt": p["prompt"], "response": p[side], "score": float(side == "chosen")}
               for p in pairs for side in ("chosen", "rejected")]
    (root / "reward.py").write_text(REWARD_FN)
    return {
        "model": str(build_tiny_llama(root / "model")),
        "copy": write_jsonl(root / "copy.jsonl", copy),
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "prompts": write_jsonl(root / "prompts.jsonl", prompts),
        "ratings": write_jsonl(root / "ratings.jsonl", ratings),
        "reward": f"{root / 'reward.py'}:short_yes",
        "half_flat": f"{root / 'reward.py'}:half_flat",
    }


def stage_args(stage: str, x: dict[str, str], world: int) -> tuple[list[str], int]:
    """(argv without the output dir, N): 2N steps in all, the checkpoint at step N."""
    common = ["--model.name_or_path", x["model"], "--run.progress", "false"]
    micro = str(4 // world)
    if stage == "sft":  # 29 training records / (global batch 8) = 3 steps per epoch: the checkpoint is at the boundary
        return ["sft", *common, "--data.datasets", f"[{x['copy']}]", "--data.data_split", "1,0,0",
                "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", micro,
                "--engine.gradient_accumulation_steps", "2", "--epochs", "2"], 3
    if stage in ("rm", "dpo", "kto"):
        return [stage, *common, "--data.datasets", f"[{x['pairs']}]", "--data.data_split", "0,1,0",
                "--data.eval_fraction", "0.2", "--engine.learning_rate", "1e-3", "--engine.micro_batch_size", micro,
                "--engine.gradient_accumulation_steps", "2", "--max_steps", "6"], 3
    if stage == "ilql":  # the Polyak-averaged target heads are part of the checkpointed state
        return ["ilql", *common, "--data.datasets", f"[{x['ratings']}]", "--data.eval_fraction", "0.2",
                "--engine.learning_rate", "1e-3", "--engine.micro_batch_size", micro,
                "--engine.gradient_accumulation_steps", "2", "--max_steps", "6", "--polyak_alpha", "0.3"], 3
    rl = [*common, "--data.datasets", f"[{x['prompts']}]", "--data.data_split", "0,0,1", "--gold_every", "0",
          "--generation.max_new_tokens", "10", "--actor_engine.learning_rate", "3e-3",
          "--actor_engine.micro_batch_size", micro, "--actor_engine.gradient_accumulation_steps", "2",
          "--max_iterations", "4"]
    if stage == "ppo":
        return ["ppo", *rl, "--reward", x["reward"], "--rollout_batch_size", "16", "--ppo_epochs", "2",
                "--critic_engine.learning_rate", "3e-3", "--critic_engine.micro_batch_size", micro,
                "--critic_engine.gradient_accumulation_steps", "2", "--kl_coef", "0.05", "--kl_target", "0.5",
                "--kl_horizon", "100", "--normalize_reward", "true", "--ema_beta", "0.9", "--ptx_coef", "0.5",
                "--ptx_data", f"[{x['copy']}]"], 2
    if stage == "grpo-dynamic":  # a reward flat on some prompts, so that further rounds are drawn
        return ["grpo", *rl, "--reward", x["half_flat"], "--rollout_batch_size", "4", "--samples_per_prompt", "4",
                "--dynamic_sampling", "true", "--normalize_reward", "true"], 2
    assert stage == "grpo"
    ensemble = f"{x['reward']} + 0.5*chatrlhf.rewards.examples:length_reward"
    return ["grpo", *rl, "--reward", ensemble, "--rollout_batch_size", "4", "--samples_per_prompt", "4"], 2


def zero2(stage: str) -> list[str]:
    engines = (["actor_engine", "critic_engine"] if stage == "ppo" else ["actor_engine"] if stage.startswith("grpo")
               else ["engine"])
    return [flag for e in engines for flag in (f"--{e}.zero_stage", "2")]


def run_cli(argv: list[str], world: int, fresh_process: bool) -> None:
    if world == 1 and not fresh_process:
        assert main(argv) == 0
        return
    prefix = [str(LAUNCHER), "--num_gpus", str(world), "--no_local_rank", "--module"] if world > 1 else [
        sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*prefix, "chatrlhf.cli", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d: load_file(out / d / "model.safetensors") for d in ("model", "critic", "model_ema") if (out / d).is_dir()}


def check_resume(stage: str, x: dict[str, str], tmp: Path, world: int) -> Path:
    argv, n = stage_args(stage, x, world)
    if world > 1:
        argv += zero2(stage)
    full, cut = tmp / "full", tmp / "cut"
    run_cli([*argv, "--run.output_dir", str(full), "--run.save_every", str(n)], world, fresh_process=False)
    # What a run killed right after its step-N save leaves: the checkpoint and the metrics so far (plus, here,
    # later rows the resumed run must drop), no final model.
    shutil.copytree(full, cut)
    for d in ("model", "critic", "model_ema", "eval.json"):
        shutil.rmtree(cut / d) if (cut / d).is_dir() else (cut / d).unlink(missing_ok=True)
    assert latest_checkpoint(cut / "checkpoints").name == f"step-{n}"
    run_cli([*argv, "--run.output_dir", str(cut), "--run.save_every", str(n), "--run.resume", "true"], world,
            fresh_process=True)

    a, b = train_rows(full), train_rows(cut)
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    for step in a:
        assert b[step] == a[step], f"step {step}: " + str({k: (a[step][k], b[step].get(k)) for k in a[step]
                                                           if a[step][k] != b[step].get(k)})
    assert any("grad_norm" in k for k in a[1])
    if stage == "sft":  # the checkpoint closed epoch 0: the resumed run does exactly epoch 1, no more, no less
        assert [a[s]["train/epoch"] for s in a] == [0, 0, 0, 1, 1, 1]
    wa, wb = weights(full), weights(cut)
    assert wa.keys() == wb.keys() and "model" in wa
    for d in wa:
        assert all(torch.equal(wa[d][k], wb[d][k]) for k in wa[d]), d
    if stage in ("ppo", "grpo", "grpo-dynamic"):  # the summary covers the iterations before the resume too
        assert json.loads((full / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())
    return full


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "ilql", "ppo", "grpo", "grpo-dynamic"])
def test_resume_in_a_fresh_process_is_bit_exact(stage, inputs, tmp_path):
    full = check_resume(stage, inputs, tmp_path, world=1)
    if stage == "grpo-dynamic":  # the resumed iterations drew further rounds: their prompts and answers matched
        assert any(row["train/sampling/rounds"] > 1 for step, row in train_rows(full).items() if step > 2)


@needs_launcher
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "ilql", "ppo", "grpo"])
def test_two_process_zero2_resume_is_bit_exact(stage, inputs, tmp_path, capsys):
    full = check_resume(stage, inputs, tmp_path, world=2)
    if stage == "sft":  # the same checkpoint resumed by one process: ZeRO-2 state is partitioned over two
        argv, n = stage_args(stage, inputs, world=1)
        before = {p: p.read_bytes() for p in full.rglob("*") if p.is_file()}
        assert main([*argv, *zero2(stage), "--run.output_dir", str(full), "--run.resume", "true"]) == 2
        err = capsys.readouterr().err
        assert "partitioned over 2 processes, but this run has 1" in err and "resume with 2 processes" in err
        assert {p: p.read_bytes() for p in full.rglob("*") if p.is_file()} == before


def test_resume_with_another_global_batch_stops_at_once(inputs, tmp_path, capsys):
    """Step N of a run with another global batch would be other data under another LR schedule."""
    argv, n = stage_args("sft", inputs, world=1)
    out = tmp_path / "run"
    assert main([*argv, "--run.output_dir", str(out), "--run.save_every", str(n), "--max_steps", str(n + 1)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--run.output_dir", str(out), "--run.resume", "true", "--engine.micro_batch_size", "2"]) == 2
    err = capsys.readouterr().err
    assert f"step-{n} was written by 1 process(es) with 8 samples per optimizer step" in err
    assert "this run has 1 process(es) with 4" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
