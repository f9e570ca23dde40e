"""SIGKILL at a random moment of a PPO run (with a critic) and of a GRPO run; a resumed run in a fresh process
ends exactly as the run that was never interrupted: every metrics row once with the same values, and the same
final weights (actor, critic, EMA actor) bit for bit.

The moment is drawn, not picked: the uninterrupted run records every event it meets (rl_crash_worker.py:
each forward of a rollout, each engine step of the update, each file written), and a seeded draw picks
event N among those of one kind. Three kills per algorithm, one per kind (generate / update / write), so the
draws cannot all land in the same phase; the label of the moment hit is in every assertion message.
"""

from __future__ import annotations

import json
import random
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fresh_process import Result, run_cli
from rl_crash_worker import KINDS
from safetensors.torch import load_file
from tiny_data import WORDS, train_rows, write_jsonl

from chatrlhf import checkpoint
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow

REWARD_FN = '''
def short_yes(prompt, response, metadata):
    return min(response.split().count("yes"), 3) - 0.02 * len(response)
'''
# 5 iterations, saves after 2 and 4 (none at the last), keep_last 1: rotation deletes step-2 right after
# step-4 is committed, the case where a wrong order would lose every checkpoint.
COMMON = ["--run.progress", "false", "--data.data_split", "0,0,1", "--gold_every", "0",
          "--generation.backend", "native", "--generation.max_new_tokens", "8", "--actor_engine.learning_rate",
          "3e-3", "--max_iterations", "5", "--run.save_every", "2", "--run.keep_last", "1"]  # fmt: skip
ALGORITHMS = {
    # PPO with every piece of state a resume must restore: critic, adaptive KL, reward normaliser, EMA actor.
    "ppo": ["ppo", "--rollout_batch_size", "8", "--actor_engine.micro_batch_size", "4",
            "--critic_engine.learning_rate", "3e-3", "--critic_engine.micro_batch_size", "4", "--kl_target", "0.5",
            "--kl_horizon", "100", "--normalize_reward", "true", "--ema_beta", "0.9"],
    "grpo": ["grpo", "--rollout_batch_size", "2", "--samples_per_prompt", "4", "--actor_engine.micro_batch_size", "4"],
}  # fmt: skip
SCRATCH = re.compile(r"^\..+\.(tmp|old)-\d+$")  # an atomic write's or publish_dir's scratch (.model.tmp-PID)
KILLS = [(algorithm, i) for algorithm in ALGORITHMS for i in range(len(KINDS))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crash_rl")
    prompts = [{"prompt": f"say {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}"} for i in range(40)]
    (root / "reward.py").write_text(REWARD_FN)
    return {"model": str(build_tiny_llama(root / "model")), "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "reward": f"{root / 'reward.py'}:short_yes"}


def argv(algorithm: str, x: dict[str, str], out: Path) -> list[str]:
    return [*ALGORITHMS[algorithm], *COMMON, "--model.name_or_path", x["model"], "--data.datasets",
            f"[{x['prompts']}]", "--reward", x["reward"], "--run.output_dir", str(out)]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """``reference(algorithm)``: (output dir, events) of the uninterrupted run, traced; run once per algorithm."""
    done: dict[str, tuple[Path, list[dict]]] = {}

    def get(algorithm: str) -> tuple[Path, list[dict]]:
        if algorithm not in done:
            out = tmp_path_factory.mktemp(f"reference-{algorithm}") / "run"
            trace = out.parent / "events.json"
            r = run_cli(argv(algorithm, inputs, out), setup=("rl_crash_worker", "install", (None, str(trace))))
            assert r.returncode == 0, r.output[-3000:]
            events = json.loads(trace.read_text())
            assert {e["kind"] for e in events} == set(KINDS), events
            done[algorithm] = out, events
        return done[algorithm]

    return get


def draw(algorithm: str, i: int, events: list[dict]) -> int:
    """Event N (1-based) to kill at: uniform among the events of kind KINDS[i], from a seeded RNG."""
    candidates = [n for n, e in enumerate(events, 1) if e["kind"] == KINDS[i]]
    return random.Random(f"{algorithm}-{i}").choice(candidates)


@dataclass
class Killed:
    moment: str  # the label of the event the kill landed at
    killed: Result
    latest: Path | None  # what latest_checkpoint() picks right after the kill
    step_dirs: dict[str, bool]  # each step-* dir right after the kill -> is_complete()
    resumed: Result


def kill_and_resume(algorithm: str, n: int, x: dict[str, str], out: Path, events: list[dict]) -> Killed:
    moment = f"{algorithm}, event {n}/{len(events)}: {events[n - 1]['label']}"
    killed = run_cli(argv(algorithm, x, out), setup=("rl_crash_worker", "install", (n, None)))
    root = out / "checkpoints"
    step_dirs = {p.name: checkpoint.is_complete(p) for p in root.glob("step-*")}
    latest = checkpoint.latest_checkpoint(root)
    resumed = run_cli([*argv(algorithm, x, out), "--run.resume", "true"])
    return Killed(moment, killed, latest, step_dirs, resumed)


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d: load_file(out / d / "model.safetensors") for d in ("model", "critic", "model_ema") if (out / d).is_dir()}


@pytest.mark.parametrize(("algorithm", "i"), KILLS, ids=[f"{a}-{KINDS[i]}" for a, i in KILLS])
def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(algorithm, i, inputs, reference, tmp_path):
    ref, events = reference(algorithm)
    n = draw(algorithm, i, events)
    k = kill_and_resume(algorithm, n, inputs, tmp_path / "run", events)
    print(f"killed at {k.moment}")
    assert k.killed.returncode == -signal.SIGKILL, (k.moment, k.killed.returncode, k.killed.output[-3000:])
    assert f"SIGKILL at event {n}: {events[n - 1]['label']}" in k.killed.output, (k.moment, k.killed.output[-1000:])

    # What the kill left: the last committed checkpoint is the one latest_checkpoint() picks, and nothing
    # half-written can be taken for a checkpoint.
    want = events[n - 1]["latest"]
    root = tmp_path / "run" / "checkpoints"
    assert k.latest == (root / f"step-{want}" if want else None), (k.moment, k.latest, k.step_dirs)
    assert all(k.step_dirs.values()), (k.moment, k.step_dirs)

    assert k.resumed.returncode == 0, (k.moment, k.resumed.output[-3000:])
    started = f"resumed RL from {k.latest} at iteration {want}" if want else "no complete checkpoint under"
    assert started in k.resumed.output, (k.moment, k.resumed.output[-3000:])

    # Every step logged once, with the uninterrupted run's values; the same final weights.
    got, expected = train_rows(tmp_path / "run"), train_rows(ref)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5], (k.moment, sorted(got))
    for step in expected:
        diff = {key: (expected[step][key], got[step].get(key)) for key in expected[step]
                if got[step].get(key) != expected[step][key]}
        assert not diff, (k.moment, step, diff)
    wa, wb = weights(ref), weights(tmp_path / "run")
    assert wa.keys() == wb.keys() and "model" in wa, (k.moment, wa.keys(), wb.keys())
    for d in wa:
        assert wa[d].keys() == wb[d].keys(), (k.moment, d)
        for name in wa[d]:
            assert torch.equal(wa[d][name], wb[d][name]), (k.moment, d, name)

    # The resumed run cleaned up what the killed one left half-written.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4"], k.moment
    assert [p.name for p in (tmp_path / "run").iterdir() if SCRATCH.match(p.name)] == [], k.moment
