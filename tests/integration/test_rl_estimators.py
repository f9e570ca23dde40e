"""Every advantage estimator of the RL stage trains a tiny random Llama on a rule reward (the reward rises),
GRPO's KL-in-the-loss is logged, A2C and PPO train a critic while the critic-free estimators save none,
and an ensemble reward logs each of its terms."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow

REWARD_FN = '''
def short_yes(prompt, response, metadata):
    """1 per word "yes" in the answer (at most 3), minus 0.02 per character: a dense rule reward."""
    return min(response.split().count("yes"), 3) - 0.02 * len(response)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    model = str(build_tiny_llama(root / "model"))
    words = "the quick brown fox jumps over lazy dog good bad answer question hello world".split()
    rows = [{"prompt": f"say {words[i % len(words)]} {words[(3 * i) % len(words)]}"} for i in range(64)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn = root / "reward.py"
    fn.write_text(REWARD_FN)
    return model, str(data), f"{fn}:short_yes"


def rl_flags(setup, out: Path, estimator: str, *extra: str) -> list[str]:
    model, data, reward = setup
    group = estimator in ("rloo", "grpo", "dr_grpo")
    return [
        "grpo",
        "--advantage_estimator", estimator,
        "--model.name_or_path", model,
        "--reward", reward,
        "--data.datasets", f"[{data}]",
        "--data.data_split", "0,0,1",
        "--run.output_dir", str(out),
        "--run.progress", "false",
        "--gold_every", "0",
        "--generation.max_new_tokens", "12",
        "--rollout_batch_size", "4" if group else "16",
        "--samples_per_prompt", "4" if group else "1",
        "--actor_engine.micro_batch_size", "8",
        "--critic_engine.micro_batch_size", "8",
        "--actor_engine.learning_rate", "3e-3",
        "--critic_engine.learning_rate", "3e-3",
        "--kl_coef", "0.01",
        *extra,
    ]  # fmt: skip


def rewards(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/reward/score"] for r in rows if "train/reward/score" in r]


@pytest.mark.parametrize("estimator", ["a2c", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo",
                                       "reinforce_pp"])
def test_estimator_learns_the_rule_reward(setup, tmp_path, estimator):
    out = tmp_path / estimator
    assert main(rl_flags(setup, out, estimator, "--max_iterations", "30", "--ppo_epochs", "2")) == 0
    r = rewards(out)
    assert len(r) == 30
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.2, r
    assert (out / "critic" / "config.json").is_file() == (estimator == "a2c")
    summary = json.loads((out / "eval.json").read_text())
    assert summary["advantage_estimator"] == estimator and summary["stage"] == estimator


def test_grpo_ensemble_reward_logs_each_term_and_k3_kl(setup, tmp_path):
    """KL in the loss (GRPO's k3 >= 0, moving off 0) and an ensemble of two reward terms, each term's raw
    score logged. (Its exact resume, normaliser state included, is in test_resume.py.)"""
    _, _, reward = setup
    out = tmp_path / "grpo"
    ensemble = f"{reward} + 0.5*chatrlhf.rewards.examples:length_reward"
    assert main(rl_flags(setup, out, "grpo", "--max_iterations", "3", "--reward", ensemble)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    a = [r for r in rows if "train/reward/score" in r]
    parts = sorted(k for k in a[0] if k.startswith("train/reward/") and k not in ("train/reward/score",
                                                                                  "train/reward/total"))
    assert len(parts) == 2, a[0].keys()
    assert all(r["train/loss/kl"] >= 0 for r in a) and a[-1]["train/loss/kl"] > 0
    assert "train/loss/value" not in a[0]


@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                    reason="needs the deepspeed launcher")
def test_grpo_two_processes_zero3(setup, tmp_path):
    """Groups stay on one process (a prompt's answers are sampled together), so the group estimator sees
    whole groups under data parallelism; ZeRO-3 with KL in the loss completes."""
    out = tmp_path / "z3"
    launcher = str(Path(sys.executable).parent / "deepspeed")
    flags = rl_flags(setup, out, "grpo", "--max_iterations", "2", "--actor_engine.zero_stage", "3",
                     "--actor_engine.micro_batch_size", "4")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--module", "chatrlhf.cli", "grpo", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rewards(out)) == 2
    assert (out / "model" / "config.json").is_file()


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/reward/score" in r]


def test_grpo_with_clip_higher_dual_clip_and_sequence_mean_learns(setup, tmp_path):
    """DAPO's clip-higher, dual-clip, TRL's seq-mean-token-mean aggregation, verl's clamped k3+ KL and DAPO's
    overlong penalty together still learn the rule reward, and the run logs the dual clip's share and both approximate KLs (k3 and the peers' k1)."""
    out = tmp_path / "dapo"
    assert main(rl_flags(setup, out, "grpo", "--max_iterations", "30", "--ppo_epochs", "2", "--clip_eps_high", "0.28",
                         "--dual_clip", "3", "--loss_agg", "seq-mean-token-mean", "--kl_estimator", "k3+",
                         "--kl_clamp", "10", "--overlong_buffer", "4")) == 0
    r = rewards(out)
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.2, r
    row = metric_rows(out)[-1]
    assert 0.0 <= row["train/clipfrac_dual"] <= 1.0 and row["train/approx_kl"] >= 0.0 and "train/approx_kl_k1" in row


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_aggregation_is_the_same_over_micro_batches(setup, tmp_path, agg):
    """One mini-batch of 8 answers as one micro-batch or as two with accumulation: the same first-iteration
    losses (the aggregation counts answers and tokens over the whole mini-batch, not per micro-batch)."""
    first = {}
    for micro, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"{micro}x{accum}"
        assert main(rl_flags(setup, out, "grpo", "--max_iterations", "1", "--loss_agg", agg, "--run.precision", "fp32",
                             "--actor_engine.micro_batch_size", str(micro),
                             "--actor_engine.gradient_accumulation_steps", str(accum))) == 0
        first[micro] = metric_rows(out)[0]
    for key in ("train/loss/policy", "train/loss/kl", "train/entropy"):
        assert first[4][key] == pytest.approx(first[8][key], rel=1e-5, abs=1e-7), key


def test_gspo_sequence_ratio_learns(setup, tmp_path):
    """GSPO's sequence-level ratio with its own aggregation and clip ranges (widened for a tiny model's large
    steps) learns the rule reward."""
    out = tmp_path / "gspo"
    assert main(rl_flags(setup, out, "grpo", "--max_iterations", "30", "--ppo_epochs", "2", "--ratio_level", "sequence",
                         "--loss_agg", "seq-mean-token-mean", "--clip_eps", "0.1", "--clip_eps_high", "0.2")) == 0
    r = rewards(out)
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.2, r
