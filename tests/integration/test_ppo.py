"""PPO on a tiny random Llama: a rule reward rises with finite KL, the first ratio is exactly 1,
2 processes under ZeRO-3 with unequal answer lengths complete, and the optional paths run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow

REWARD_FN = '''
def short_yes(prompt, response, metadata):
    """1 per word "yes" in the answer (at most 3), minus 0.02 per character: a dense rule reward."""
    return min(response.split().count("yes"), 3) - 0.02 * len(response)
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    words = "the quick brown fox jumps over lazy dog good bad answer question hello world".split()
    rows = [{"prompt": f"say {words[i % len(words)]} {words[(3 * i) % len(words)]}"} for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/reward/score" in r]


def ppo_flags(model: str, data: str, reward: str, out: Path) -> list[str]:
    return [
        "ppo",
        "--model.name_or_path", model,
        "--reward", reward,
        "--data.datasets", f"[{data}]",
        "--data.data_split", "0,0,1",
        "--run.output_dir", str(out),
        "--run.progress", "false",
        "--gold_every", "0",
        "--generation.max_new_tokens", "12",
        "--rollout_batch_size", "16",
        "--actor_engine.micro_batch_size", "8",
        "--critic_engine.micro_batch_size", "8",
        "--actor_engine.learning_rate", "3e-3",
        "--critic_engine.learning_rate", "3e-3",
        "--kl_coef", "0.01",
    ]  # fmt: skip


def test_ppo_rule_reward_rises_with_finite_kl(tiny_model, prompts, tmp_path):
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD_FN)
    out = tmp_path / "ppo"
    flags = ppo_flags(tiny_model, prompts, f"{fn}:short_yes", out) + ["--max_iterations", "24", "--ppo_epochs", "2"]
    assert main(flags) == 0
    rows = read_metrics(out)
    assert len(rows) == 24
    rewards = [r["train/reward/score"] for r in rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards  # from about -0.36 (long random answers) toward 0
    assert all(abs(r["train/kl"]) < 1e3 for r in rows)
    # Old log-probs and values come from eval-mode forwards of the same weights: the first mini-batch
    # of the first PPO epoch sees ratio 1 (nothing has been updated yet).
    assert rows[0]["train/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    for name in ("model", "critic"):
        assert (out / name / "config.json").is_file()


@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                    reason="needs the deepspeed launcher")
def test_ppo_two_processes_zero3_unequal_answer_lengths(tiny_model, prompts, tmp_path):
    """Ranks finish generating at different steps (random answers, EOS anywhere); lock-step decoding and
    the ZeRO-3 gather must not hang. A watchdog (timeout) fails the test instead of hanging CI."""
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD_FN)
    out = tmp_path / "z3"
    launcher = str(Path(sys.executable).parent / "deepspeed")
    flags = ppo_flags(tiny_model, prompts, f"{fn}:short_yes", out)[1:] + [
        "--max_iterations", "2", "--actor_engine.zero_stage", "3", "--critic_engine.zero_stage", "3",
        "--actor_engine.micro_batch_size", "4", "--critic_engine.micro_batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--module", "chatrlhf.cli", "ppo", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 2
    assert (out / "model" / "config.json").is_file()


def test_ppo_options_ptx_ema_adaptive_kl_and_kl_stop(tiny_model, prompts, tmp_path):
    """The optional paths run end to end: PPO-ptx on SFT text, the EMA actor, the adaptive KL controller
    (beta moves toward its target) and early stopping of the PPO epochs."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"copy {w}", "response": w}) + "\n"
                           for w in "yes no good bad hello world".split() * 4))
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD_FN)
    out = tmp_path / "ppo"
    flags = ppo_flags(tiny_model, prompts, f"{fn}:short_yes", out) + [
        "--max_iterations", "3", "--ppo_epochs", "4", "--ptx_coef", "0.5", "--ptx_data", f"[{sft}]",
        "--ema_beta", "0.9", "--kl_target", "0.01", "--kl_horizon", "100", "--kl_stop", "1e-9"]
    assert main(flags) == 0
    rows = read_metrics(out)
    assert all(r["train/ptx/loss"] > 0 for r in rows)
    # kl_stop 1e-9: the first mini-batch sees the rollout's own weights (approx KL 0); the second sees
    # updated weights, exceeds the limit, and the remaining 3 epochs x 2 mini-batches are skipped.
    assert all(r["train/early_stop"] == 1.0 and r["train/ppo_updates"] == 2 for r in rows)
    betas = [r["train/kl_coef"] for r in rows]
    assert betas[0] == pytest.approx(0.01) and betas[1] != betas[0]
    assert (out / "model_ema" / "config.json").is_file()


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> str:
    """A reward-model dir with the actor's tokenizer: the tiny trunk and a fresh seeded head."""
    from chatrlhf.models import RewardModel, load_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "model"
    RewardModel.from_causal_lm(tiny_model).save_pretrained(out, tokenizer=load_tokenizer(tiny_model))
    return str(out)


def placed_flags(tiny_model, prompts, reward_model, out: Path, placement: str) -> list[str]:
    return ppo_flags(tiny_model, prompts, reward_model, out)[1:] + [
        "--max_iterations", "2", "--critic", tiny_model, "--reference_placement", placement,
        "--reward_placement", placement]  # fmt: skip


def test_reference_and_reward_offloaded_to_cpu_give_the_same_run(tiny_model, prompts, reward_model, tmp_path):
    for placement in ("device", "cpu"):
        assert main(["ppo", *placed_flags(tiny_model, prompts, reward_model, tmp_path / placement, placement)]) == 0
    a, b = read_metrics(tmp_path / "device"), read_metrics(tmp_path / "cpu")
    for key in ("train/reward/score", "train/kl", "train/loss/policy"):
        assert [r[key] for r in a] == [r[key] for r in b], key


@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                    reason="needs the deepspeed launcher")
def test_reference_and_reward_sharded_zero3_match_replicated(tiny_model, prompts, reward_model, tmp_path):
    """2 processes: the frozen reference and reward model sharded by ZeRO-3 inference engines (1/2 each)
    score exactly what full copies score: same rewards and KL, up to float summation order."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for placement in ("device", "zero3"):
        flags = placed_flags(tiny_model, prompts, reward_model, tmp_path / placement, placement)
        cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--module", "chatrlhf.cli", "ppo", *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = read_metrics(tmp_path / "device"), read_metrics(tmp_path / "zero3")
    assert len(a) == len(b) == 2
    for key in ("train/reward/score", "train/kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-7), key
