"""Advantage estimators: each against the hand-computed example in its docstring, plus the edge cases
(equal rewards in a group, a fully masked answer) and the reference equivalences (A2C == GAE with lam 1)."""

import math

import pytest
import torch

from chatrlhf.algorithms import policy_loss, rl
from chatrlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    GRPO_EPS,
    a2c_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_advantages,
    reinforce_baseline_advantages,
    returns_to_go,
    rloo_advantages,
    sequence_rewards,
)

T = torch.tensor


def close(a, b, rtol=1e-6, atol=1e-7):
    torch.testing.assert_close(a.double(), T(b, dtype=torch.float64), rtol=rtol, atol=atol)


def _last_token_rewards(scores, length=3):
    """(B,) scores on the last of ``length`` answer tokens; full masks."""
    r = torch.zeros(len(scores), length, dtype=torch.float64)
    r[:, -1] = T(scores, dtype=torch.float64)
    return r, torch.ones_like(r)


def test_returns_to_go_hand_example():
    close(returns_to_go(T([[1.0, 2.0, 4.0, 9.0]]), T([[1, 1, 1, 0]]), 0.5), [[3.0, 4.0, 4.0, 0.0]])


def test_sequence_rewards_hand_example():
    close(sequence_rewards(T([[1.0, 2.0, 9.0], [0.0, -1.0, 3.0]]), T([[1, 1, 0], [1, 1, 1]])), [3.0, 2.0])


def test_reinforce_is_return_to_go():
    adv, ret = reinforce_advantages(T([[0.5, 0.0, 2.0]]), T([[1, 1, 1]]), None, 1, 1.0, 0.95)
    close(adv, [[2.5, 2.0, 2.0]])
    close(ret, [[2.5, 2.0, 2.0]])


def test_reinforce_baseline_hand_example():
    adv, _ = reinforce_baseline_advantages(T([[0.0, 1.0], [0.0, 3.0]]), T([[1, 1], [1, 1]]), None, 1, 1.0, 1.0)
    close(adv, [[-1.0, -1.0], [1.0, 1.0]])


def test_reinforce_baseline_is_global_over_processes():
    """Two processes, one answer each: G_0 = 1 here and 3 on the other, so b = 2 on both (not each its own
    return, which would give zero advantages). ``reduce`` stands in for the all-reduce: it adds the other
    process's (sum 3, count 1)."""
    other = torch.tensor([3.0, 1.0], dtype=torch.float64)
    adv, _ = reinforce_baseline_advantages(T([[0.0, 1.0]]), T([[1, 1]]), None, 1, 1.0, 1.0,
                                           reduce=lambda total: total + other)
    close(adv, [[-1.0, -1.0]])
    alone, _ = reinforce_baseline_advantages(T([[0.0, 1.0]]), T([[1, 1]]), None, 1, 1.0, 1.0)
    close(alone, [[0.0, 0.0]])


def test_a2c_hand_example_and_equals_gae_with_lambda_one():
    r, v, m = T([[0.0, 0.0, 2.0]]), T([[0.5, 1.0, 1.5]]), T([[1, 1, 1]])
    adv, ret = a2c_advantages(r, m, v, 1, 1.0, 0.95)
    close(adv, [[1.5, 1.0, 0.5]])
    close(ret, [[2.0, 2.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    m = T([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    for gamma in (1.0, 0.9):
        adv, ret = a2c_advantages(r, m, v, 1, gamma, 0.5)
        ref_adv, ref_ret = rl.gae(r, v, m, gamma, 1.0)
        torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_rloo_hand_example():
    r, m = _last_token_rewards([1.0, 2.0, 6.0])
    adv, _ = rloo_advantages(r, m, None, 3, 1.0, 1.0)
    close(adv, [[-3.0] * 3, [-1.5] * 3, [4.5] * 3])


def test_grpo_hand_example_two_groups():
    r, m = _last_token_rewards([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], length=2)
    adv, _ = grpo_advantages(r, m, None, 3, 1.0, 1.0)
    s7 = math.sqrt(7.0) + GRPO_EPS
    std2 = math.sqrt((1 + 1 + 4) / 2) + GRPO_EPS  # group [0, 0, 3]: mean 1, deviations [-1, -1, 2]
    close(adv, [[-2 / s7] * 2, [-1 / s7] * 2, [3 / s7] * 2, [-1 / std2] * 2, [-1 / std2] * 2, [2 / std2] * 2])


def test_dr_grpo_hand_example():
    r, m = _last_token_rewards([1.0, 2.0, 6.0])
    adv, _ = dr_grpo_advantages(r, m, None, 3, 1.0, 1.0)
    close(adv, [[-2.0] * 3, [-1.0] * 3, [3.0] * 3])


@pytest.mark.parametrize("name", ["rloo", "grpo", "dr_grpo"])
def test_equal_rewards_in_a_group_give_zero_advantages_and_a_finite_loss(name):
    r, m = _last_token_rewards([0.7] * 4)
    adv, _ = ADVANTAGE_ESTIMATORS[name].fn(r, m, None, 4, 1.0, 1.0)
    assert torch.equal(adv, torch.zeros_like(adv))
    logp = torch.full((4, 3), -1.0, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), adv, m, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_fully_masked_answer_gives_zero_advantage_finite_loss_and_zero_gradient(name):
    """Row 1 has no answer tokens (and garbage rewards/values there): its advantages are 0, the loss is
    finite and its log-probs get no gradient; the other rows are unaffected by the garbage."""
    r = T([[0.0, 1.0], [float("nan"), float("inf")], [0.0, 3.0], [0.0, -1.0]], dtype=torch.float64)
    v = T([[0.1, 0.2], [float("nan"), 5.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    m = T([[1, 1], [0, 0], [1, 1], [1, 1]])
    adv, ret = ADVANTAGE_ESTIMATORS[name].fn(r, m, v, 2, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.equal(adv[1], torch.zeros(2, dtype=adv.dtype))
    logp = torch.full((4, 2), -1.0, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), adv, m, 0.2)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(logp.grad[1], torch.zeros(2, dtype=torch.float64))


def test_group_estimators_reject_a_batch_that_is_not_whole_groups():
    r, m = _last_token_rewards([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="group size 2"):
        grpo_advantages(r, m, None, 2, 1.0, 1.0)


def test_config_rejects_one_sample_for_group_estimators():
    from chatrlhf.config import ConfigError
    from chatrlhf.stages.ppo_config import GRPOConfig

    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        GRPOConfig(reward="rater", samples_per_prompt=1).validate()
    GRPOConfig(reward="rater", samples_per_prompt=1, advantage_estimator="reinforce_pp").validate()


def test_table_flags():
    needs_critic = {k for k, e in ADVANTAGE_ESTIMATORS.items() if e.critic}
    grouped = {k for k, e in ADVANTAGE_ESTIMATORS.items() if e.grouped}
    assert needs_critic == {"gae", "a2c"} and grouped == {"rloo", "grpo", "dr_grpo"}
