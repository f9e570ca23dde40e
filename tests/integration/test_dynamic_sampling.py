"""DAPO's dynamic sampling on a tiny random Llama: with a rule reward that is the same for every answer to half
of the prompts, the iterations draw further rounds, train only on groups whose rewards differ (the batch the
update reads is checked group by group), log the sampling figures, and two runs give the same metrics; the
same holds for an environment's episodes."""

import json
from pathlib import Path

import pytest
import torch
from tiny_data import train_rows

from chatrlhf.algorithms.dynamic_sampling import informative_groups
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.stages import ppo

pytestmark = pytest.mark.slow
WORDS = "the quick brown fox jumps over lazy dog good bad answer question hello world".split()
VARIED = WORDS[:5]
REWARD_FN = f'''
VARIED = {VARIED!r}


def half_flat(prompt, response, metadata):
    """A prompt "say W ..." with W in VARIED scores each answer by its length (a group's answers differ); any
    other prompt scores 0 whatever the answer (an all-equal group)."""
    return len(response) / 10 if prompt.split()[1] in VARIED else 0.0
'''
ENV = f'''
from chatrlhf.environments import Environment, Step

VARIED = {VARIED!r}


class HalfFlatEnv(Environment):
    """Two turns: 0.5 for the first reply (a per-turn reward, the same for all), then the final reward of
    ``half_flat`` for the second."""

    max_turns = 2
    end_on_cut = False  # a tiny random model's replies are cut at the token limit: answer them anyway

    def step(self, state, reply):
        state["turn"] = state.get("turn", 0) + 1
        if state["turn"] == 2:
            varied = state["prompt"][-1]["content"].split()[1] in VARIED
            return Step(reward=len(reply) / 10 if varied else 0.0, done=True)
        return Step(messages=[{{"role": "user", "content": "again"}}], reward=0.5)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    model = str(build_tiny_llama(root / "model"))
    rows = [{"prompt": f"say {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}"} for i in range(64)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "reward.py").write_text(REWARD_FN)
    (root / "env.py").write_text(ENV)
    return {"model": model, "data": str(data), "reward": f"{root / 'reward.py'}:half_flat",
            "env": f"{root / 'env.py'}:HalfFlatEnv"}


def flags(x: dict, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--model.name_or_path", x["model"], "--data.datasets", f"[{x['data']}]",
            "--data.data_split", "0,0,1", "--run.output_dir", str(out), "--run.progress", "false",
            "--gold_every", "0", "--generation.max_new_tokens", "8", "--rollout_batch_size", "4",
            "--samples_per_prompt", "4", "--actor_engine.micro_batch_size", "8", "--actor_engine.learning_rate", "3e-3",
            "--kl_coef", "0.01", "--run.precision", "fp32", "--dynamic_sampling", "true", "--max_iterations", "3",
            *extra]  # fmt: skip


@pytest.fixture
def trained(monkeypatch):
    """Every iteration's trained batch, as the advantages see it: (scores + per-turn rewards (B,), sampling counts,
    raw scores)."""
    seen = []
    original = ppo.compute_advantages

    def spy(run, exp):
        turns = exp.turn_rewards.sum(-1) if exp.turn_rewards is not None else 0.0
        seen.append((exp.scores + turns, dict(exp.sampling), exp.raw_scores.clone()))
        return original(run, exp)

    monkeypatch.setattr(ppo, "compute_advantages", spy)
    return seen


def check_batches(seen: list, rows: dict[int, dict]) -> None:
    """Each trained batch holds 4 groups, as many all-equal ones as were filled (none when the rounds sufficed);
    the logged figures are the trained batch's and the rounds'."""
    assert len(seen) == len(rows) == 3
    for (totals, counts, raw), step in zip(seen, sorted(rows)):
        row = rows[step]
        informative = informative_groups(totals, 4)
        assert len(informative) == 4 and int((~informative).sum()) == counts["filled"] == row["train/sampling/filled"]
        assert row["train/sampling/rounds"] == counts["rounds"] and 1 <= counts["rounds"] <= 3
        assert row["train/sampling/kept_frac"] == counts["informative"] / counts["groups"]
        assert counts["groups"] == 4 * counts["rounds"]
        assert row["train/reward/score"] == pytest.approx(raw.double().mean().item(), rel=1e-6)
        assert "train/sampling/first_round_reward" in row


def test_dynamic_sampling_trains_on_informative_groups_and_is_deterministic(setup, tmp_path, trained):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(flags(setup, a, "--reward", setup["reward"])) == 0
    check_batches(trained, train_rows(a))
    assert all(r["train/sampling/kept_frac"] < 1.0 for r in train_rows(a).values())
    assert any(counts["rounds"] > 1 for _, counts, _ in trained)
    assert any(counts["filled"] == 0 for _, counts, _ in trained)  # the rounds sufficed at least once
    first = [t.clone() for t, _, _ in trained]
    trained.clear()
    assert main(flags(setup, b, "--reward", setup["reward"])) == 0
    assert train_rows(a) == train_rows(b)
    assert all(torch.equal(x, y) for x, (y, _, _) in zip(first, trained))


def test_one_round_fills_with_all_equal_groups(setup, tmp_path, trained):
    """``--max_sampling_rounds 1``: no further rounds; the all-equal groups stay in the batch and are counted."""
    out = tmp_path / "one"
    assert main(flags(setup, out, "--reward", setup["reward"], "--max_sampling_rounds", "1")) == 0
    check_batches(trained, train_rows(out))
    assert all(counts["rounds"] == 1 for _, counts, _ in trained)
    assert any(counts["filled"] > 0 for _, counts, _ in trained)


def test_dynamic_sampling_on_episodes(setup, tmp_path, trained):
    """Episodes of two turns: the per-turn reward (the same for all) and the final one together decide."""
    out = tmp_path / "env"
    assert main(flags(setup, out, "--env", setup["env"])) == 0
    rows = train_rows(out)
    check_batches(trained, rows)
    assert all(r["train/env/turns"] == 2.0 for r in rows.values())  # the per-turn reward is in every episode
    assert any(counts["rounds"] > 1 for _, counts, _ in trained)
