"""DAPO's dynamic sampling: the pure part against hand-worked examples (which groups are informative, which are
kept and filled), the stateless refill draws, the rows of several rounds stacked into one rollout, the config's
refusals, and the round loop itself on a fake run whose rewards are known in advance (no model)."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chatrlhf import cli_errors
from chatrlhf.algorithms.dynamic_sampling import informative_groups, pick_groups
from chatrlhf.config import ConfigError
from chatrlhf.rollout import Rollout
from chatrlhf.rollout.types import stack_rows
from chatrlhf.stages import ppo_sampling
from chatrlhf.stages.ppo_config import GRPOConfig, PPOConfig
from chatrlhf.stages.ppo_metrics import sampling_metrics

T = torch.tensor


# ---- the pure part --------------------------------------------------------------------------------------


def test_informative_groups_hand_example():
    # groups of 3: [1, 1, 1] all equal, [0, 1, 0] not, [2, 2, 2] all equal
    assert informative_groups(T([1.0, 1, 1, 0, 1, 0, 2, 2, 2]), 3).tolist() == [False, True, False]


def test_informative_groups_is_exact_equality():
    """A group differing by one ulp is kept (its GRPO advantages are not zero); -0.0 == 0.0 is all-equal."""
    one = T(1.0, dtype=torch.float32)
    ulp = torch.nextafter(one, T(2.0))
    assert informative_groups(torch.stack([one, ulp, T(0.0), T(-0.0)]), 2).tolist() == [True, False]


def test_informative_groups_refuses_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="batch 5, group size 2"):
        informative_groups(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group size 1"):
        informative_groups(torch.zeros(4), 1)


@pytest.mark.parametrize("flags,target,kept,filled", [
    ([False, True, False, True, True, True], 3, [1, 3, 4], []),  # the last informative group is discarded
    ([False, True, False, False], 3, [1], [0, 2]),  # one found: the first two all-equal groups fill the rest
    ([True, True], 2, [0, 1], []),
    ([False, False, False], 2, [], [0, 1]),
])
def test_pick_groups_hand_examples(flags, target, kept, filled):
    assert pick_groups(flags, target) == (kept, filled)


def test_pick_groups_refuses_too_few_groups():
    with pytest.raises(ValueError, match="needs 3 groups .* produced only 2"):
        pick_groups([True, False], 3)


# ---- refill draws ---------------------------------------------------------------------------------------


def test_refill_round_is_stateless_and_deterministic():
    """The same (seed, iteration, round, rank) gives the same prompts and answers' generator; the global numpy
    and torch generators are neither read nor advanced (a resumed run's other draws stay the same)."""
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a, gen_a = ppo_sampling.refill_round(50, 8, 42, 7, 1, 0)
    b, gen_b = ppo_sampling.refill_round(50, 8, 42, 7, 1, 0)
    assert a == b and len(a) == 8 and len(set(a)) == 8 and all(0 <= i < 50 for i in a)
    assert torch.equal(torch.rand(4, generator=gen_a), torch.rand(4, generator=gen_b))
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    others = [ppo_sampling.refill_round(50, 8, *args)[0] for args in ((43, 7, 1, 0), (42, 8, 1, 0), (42, 7, 2, 0),
                                                                        (42, 7, 1, 1))]
    assert all(o != a for o in others)  # seed, iteration, round and rank each change the draw


def test_refill_round_repeats_prompts_only_when_it_must():
    small, _ = ppo_sampling.refill_round(3, 5, 0, 0, 1, 0)
    assert len(small) == 5 and set(small) <= {0, 1, 2}
    negative_seed, _ = ppo_sampling.refill_round(10, 4, -1, 0, 1, 0)  # a negative seed is a valid one
    assert len(set(negative_seed)) == 4


# ---- rows of several rounds, one rollout ----------------------------------------------------------------


def test_stack_rows_hand_example():
    """The docstring's example: A has prompt [5, 6] and response [7]; B prompt [9] and response [8, 2]."""
    a = Rollout(T([[5, 6]]), T([[1, 1]]), T([[7]]), T([[1]]), T([True]), T([[-0.5]]))
    b = Rollout(T([[9]]), T([[1]]), T([[8, 2]]), T([[1, 1]]), T([False]), T([[-1.0, -2.0]]))
    out = stack_rows([(a, [0]), (b, [0])], pad_token_id=0)
    assert out.prompt_ids.tolist() == [[5, 6], [0, 9]] and out.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert out.response_ids.tolist() == [[7, 0], [8, 2]] and out.response_mask.tolist() == [[1, 0], [1, 1]]
    assert out.finished.tolist() == [True, False] and out.log_probs.tolist() == [[-0.5, 0.0], [-1.0, -2.0]]
    assert out.context_mask is None


def test_stack_rows_picks_rows_in_order_and_keeps_context_masks():
    """Rows 1 then 0 of an episode rollout (environment tokens at response position 1: context, not policy)."""
    ep = Rollout(T([[3], [4]]), T([[1], [1]]), T([[5, 6, 7], [8, 0, 0]]), T([[1, 0, 1], [1, 0, 0]]), T([True, False]),
                 torch.zeros(2, 3), context_mask=T([[1, 1, 1], [1, 0, 0]]))
    out = stack_rows([(ep, [1, 0]), (ep, [])], pad_token_id=0)
    assert out.prompt_ids.tolist() == [[4], [3]] and out.response_ids.tolist() == [[8, 0, 0], [5, 6, 7]]
    assert out.context_mask.tolist() == [[1, 0, 0], [1, 1, 1]] and out.finished.tolist() == [False, True]


# ---- config ---------------------------------------------------------------------------------------------


def test_config_refuses_dynamic_sampling_without_groups():
    flags = set(cli_errors.flag_names(GRPOConfig))
    cases = [
        (PPOConfig(reward="rater", dynamic_sampling=True), "--advantage_estimator"),  # GAE: no groups
        (GRPOConfig(reward="rater", dynamic_sampling=True, advantage_estimator="reinforce_pp", samples_per_prompt=4),
         "--advantage_estimator"),
        (GRPOConfig(reward="rater", dynamic_sampling=True, samples_per_prompt=1),  # grpo, but no groups
         "--samples_per_prompt >= 2"),
        (GRPOConfig(reward="rater", max_sampling_rounds=0), "--max_sampling_rounds must be >= 1"),
    ]
    for cfg, says in cases:
        with pytest.raises(ConfigError, match=re.escape(says)) as err:
            cfg.validate()
        named = re.findall(r"--([a-z_][\w.]*[a-z_0-9])", str(err.value))
        assert set(named) <= flags and ("dynamic_sampling" in named or "max_sampling_rounds" in named), err.value
    for estimator in ("grpo", "rloo", "dr_grpo"):
        GRPOConfig(reward="rater", dynamic_sampling=True, advantage_estimator=estimator).validate()
    GRPOConfig(reward="rater", dynamic_sampling=True, max_sampling_rounds=1, env=None).validate()


# ---- the round loop on a fake run ------------------------------------------------------------------------


def reward_of(prompt: int, answer: int) -> float:
    """An even prompt's two answers score 0 and prompt + 1 (informative), an odd one's 1 and 1 (all equal)."""
    return float((prompt + 1) * answer) if prompt % 2 == 0 else 1.0


def fake_run(max_rounds: int, others_short: bool = False):
    """Groups of 2; 4 groups per process. ``others_short``: the all-reduce reports another process still short."""
    cfg = SimpleNamespace(samples_per_prompt=2, max_sampling_rounds=max_rounds, missing_eos_penalty=0.0,
                          overlong_buffer=0, actor_engine=SimpleNamespace(seed=0))
    actor = SimpleNamespace(all_reduce=lambda t: t + 1 if others_short else t)
    reward = lambda batch: T([m["r"] for m in batch.meta])  # noqa: E731
    return SimpleNamespace(cfg=cfg, actor=actor, reward=reward, prompts=list(range(10)), rank=0,
                           tokenizer=SimpleNamespace(pad_token_id=0), env=None)


def fake_generate(calls: list):
    """Round r's rows: prompt ids [0] * r + [100 + prompt] (each round padded to its own width), responses
    [prompt, answer]; the reward rides in meta."""
    def generate(run, prompts, gen):
        r = len(calls)
        calls.append((list(prompts), gen))
        rows = [(p, j) for p in prompts for j in range(2)]
        rollout = Rollout(T([[0] * r + [100 + p] for p, _ in rows]), T([[0] * r + [1] for _ in rows]),
                          T([[p, j] for p, j in rows]), torch.ones(len(rows), 2, dtype=torch.long),
                          torch.ones(len(rows), dtype=torch.bool), torch.zeros(len(rows), 2))
        batch = {"prompts": [[{"role": "user", "content": str(p)}] for p, _ in rows],
                 "responses": [f"{p}.{j}" for p, j in rows], "meta": [{"r": reward_of(p, j)} for p, j in rows]}
        return rollout, batch
    return generate


REFILLS = {1: [0, 5, 6, 7], 2: [8, 9, 2, 4]}


@pytest.fixture
def rounds(monkeypatch):
    calls = []
    monkeypatch.setattr(ppo_sampling, "generate_answers", fake_generate(calls))
    monkeypatch.setattr(ppo_sampling, "refill_round", lambda n, count, seed, it, r, rank: (REFILLS[r], f"gen{r}"))
    return calls


def kept_prompts(rollout) -> list[int]:
    return [int(p) - 100 for p in rollout.prompt_ids[::2, -1]]


def test_rounds_stop_once_the_groups_differ(rounds):
    """Round 0 [1, 2, 3, 4] holds 2 informative groups (prompts 2, 4); round 1 [0, 5, 6, 7] two more (0, 6):
    4 = the target, so no round 2; 8 groups generated, 4 informative."""
    rollout, batch = ppo_sampling.sample_informative(fake_run(3), 0, [1, 2, 3, 4], "gen0")
    assert [c[1] for c in rounds] == ["gen0", "gen1"]  # round 0 keeps the iteration's own generator
    assert kept_prompts(rollout) == [2, 4, 0, 6]
    assert rollout.prompt_ids[:4, 0].tolist() == [0, 0, 0, 0] and rollout.prompt_mask[:4].tolist() == [[0, 1]] * 4
    assert batch["raw_scores"].tolist() == [0.0, 3.0, 0.0, 5.0, 0.0, 1.0, 0.0, 7.0]
    assert batch["responses"] == ["2.0", "2.1", "4.0", "4.1", "0.0", "0.1", "6.0", "6.1"]
    assert [m["r"] for m in batch["meta"]] == batch["raw_scores"].tolist()
    assert batch["sampling"] == {"rounds": 2, "groups": 8, "informative": 4, "filled": 0,
                                 "first_reward_sum": 12.0,  # [1, 1] + [0, 3] + [1, 1] + [0, 5]
                                 "first_answers": 8}


def test_out_of_rounds_fills_with_all_equal_groups(rounds):
    """One round allowed: prompts 2 and 4 kept, the first two all-equal groups (1, 3) fill, in batch order."""
    rollout, batch = ppo_sampling.sample_informative(fake_run(1), 0, [1, 2, 3, 4], "gen0")
    assert len(rounds) == 1 and kept_prompts(rollout) == [1, 2, 3, 4]
    assert batch["sampling"]["filled"] == 2 and batch["sampling"]["informative"] == 2


def test_extra_informative_groups_are_discarded(rounds, monkeypatch):
    """Round 1 [0, 6, 8, 5] finds three informative groups for two places: 0 and 6 are kept, 8 discarded."""
    monkeypatch.setitem(REFILLS, 1, [0, 6, 8, 5])
    rollout, batch = ppo_sampling.sample_informative(fake_run(3), 0, [1, 2, 3, 4], "gen0")
    assert kept_prompts(rollout) == [2, 4, 0, 6] and batch["sampling"]["informative"] == 5


def test_a_full_process_joins_the_rounds_another_still_needs(rounds):
    """All of round 0 informative here, but another process is short: every round runs (lock-step), and this
    process still trains on its round-0 groups, the first ones."""
    rollout, batch = ppo_sampling.sample_informative(fake_run(3, others_short=True), 0, [0, 2, 4, 6], "gen0")
    assert len(rounds) == 3 and batch["sampling"]["rounds"] == 3
    assert kept_prompts(rollout) == [0, 2, 4, 6] and rollout.prompt_ids.shape[1] == 3


def test_sampling_metrics_over_processes():
    """Two processes' counts, the all-reduce doubling this one's: kept 5 of 8 groups, 1 filled, round-0 mean."""
    counts = {"rounds": 2, "groups": 4, "informative": 2.5, "filled": 0.5, "first_reward_sum": 3.0,
              "first_answers": 4}
    run = SimpleNamespace(actor=SimpleNamespace(all_reduce=lambda t: 2 * t))
    assert sampling_metrics(run, counts) == {"sampling/rounds": 2.0, "sampling/kept_frac": 5 / 8,
                                             "sampling/filled": 1.0, "sampling/first_round_reward": 0.75}
    assert sampling_metrics(run, None) == {}


def test_penalised_scores_hand_example():
    """missing_eos_penalty 0.5 on the unfinished answer; overlong buffer 2 of max 4 tokens, penalty 1: a 4-token
    answer loses 1, a 3-token one 0.5 (rl.overlong_penalty), a 2-token one nothing."""
    cfg = SimpleNamespace(missing_eos_penalty=0.5, overlong_buffer=2, overlong_penalty=1.0,
                          generation=SimpleNamespace(max_new_tokens=4))
    mask = T([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    rollout = Rollout(torch.zeros(3, 1), torch.ones(3, 1), torch.zeros(3, 4), mask, T([False, True, True]),
                      torch.zeros(3, 4))
    out = ppo_sampling.penalised_scores(cfg, T([1.0, 1.0, 1.0]), rollout)
    torch.testing.assert_close(out, T([1.0 - 0.5 - 1.0, 1.0 - 0.5, 1.0]), rtol=0, atol=0)
