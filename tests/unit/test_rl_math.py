"""Hand-computed checks of the PPO math in chatrlhf.algorithms.rl and the PPO losses in
chatrlhf.algorithms.losses (float64, rtol 1e-6 or tighter)."""

import json
import math

import pytest
import torch

from chatrlhf.algorithms.losses import entropy_from_logits, policy_loss, value_loss
from chatrlhf.algorithms.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    explained_variance,
    explained_variance_from_sums,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    moment_sums,
    sequence_kl,
    shaped_rewards,
    whiten,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def close(actual, expected, rtol=1e-6, atol=1e-12):
    """assert_close in float64; the small atol only matters where the expected value is exactly 0."""
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def ragged_mask():
    """(6, 7) masks: prompt then padding, full, prompt then answer to the end, empty, answer then padding,
    and a gap inside the row (a multi-turn episode's environment turn: skipped, bootstrapped across)."""
    return t(
        [
            [0, 0, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 0, 1, 1, 0, 0],
        ]
    )


def garbage_off_mask(x, mask, seed):
    """x with every mask == 0 entry replaced by fresh randn values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(mask.bool(), x, 100 * torch.randn(x.shape, generator=gen, dtype=x.dtype))


# --- KL estimators ---


def test_kl_estimators_by_hand():
    """log p = [-1, -2, -0.5], log q = [-2, -1, -0.5]:
    k1 = log p - log q = [1, -1, 0] (negative for the second token);
    k2 = 0.5 (log p - log q)^2 = [0.5, 0.5, 0];
    k3 = e^d - d - 1, d = log q - log p = [-1, 1, 0] -> [e^-1, e - 2, 0]
       = [0.36787944117144233, 0.7182818284590451, 0].
    """
    lp, lq = t([-1.0, -2.0, -0.5]), t([-2.0, -1.0, -0.5])
    close(kl_k1(lp, lq), [1.0, -1.0, 0.0])
    close(kl_k2(lp, lq), [0.5, 0.5, 0.0])
    close(kl_k3(lp, lq), [0.36787944117144233, 0.7182818284590451, 0.0])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "k3+"} and KL_ESTIMATORS["k3"] is kl_k3


def test_kl_k3_nonnegative_and_precise_for_tiny_differences():
    """k3 >= 0 everywhere; for d = 1e-9, k3 ~ d^2 / 2 = 5e-19 (exp(d) - 1 - d in float64 is rounding noise)."""
    gen = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(1000, generator=gen, dtype=F64), torch.randn(1000, generator=gen, dtype=F64)
    assert (kl_k3(lp, lq) >= 0).all()
    assert (kl_k1(lp, lq) < 0).any()
    close(kl_k3(t([0.0]), t([1e-9])), [5e-19], atol=0, rtol=1e-6)


def test_sequence_kl_by_hand():
    """Row 0: 0.1 + 0.2 = 0.3 (0.3 is masked out); row 1: 2 + 3 = 5 (the 1 is masked out)."""
    close(sequence_kl(t([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]), t([[1, 1, 0], [0, 1, 1]])), [0.3, 5.0])


# --- shaped rewards ---


def test_shaped_rewards_by_hand():
    """kl_coef 0.5, clip 3. Row 0 (pad == eos layout, mask [1, 1, 1, 0]): -0.5 kl = [-0.05, -0.1, -0.15] and
    the score 2 on index 2 (the EOS), not on the pad: [-0.05, -0.1, 1.85, 0].
    Row 1 (left prompt): -0.5 kl = [_, 0.1, -0.1, -0.3], score -5 clipped to -3 on index 3:
    [0, 0.1, -0.1, -3.3].
    Row 2 (empty mask): all zeros, the score 7 goes nowhere."""
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.4, -0.2, 0.2, 0.6], [1.0, 1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    out = shaped_rewards(t([2.0, -5.0, 7.0]), kl, mask, kl_coef=0.5, clip=3.0)
    close(out, [[-0.05, -0.1, 1.85, 0.0], [0.0, 0.1, -0.1, -3.3], [0.0, 0.0, 0.0, 0.0]])
    # Without clip the raw score lands: -0.3 - 5 = -5.3.
    unclipped = shaped_rewards(t([2.0, -5.0, 7.0]), kl, mask, kl_coef=0.5)
    assert unclipped[1, 3].item() == pytest.approx(-5.3, rel=1e-12)
    assert torch.equal(shaped_rewards(t([2.0, -5.0, 7.0]), kl, mask.bool(), kl_coef=0.5), unclipped)


# --- GAE ---


def test_gae_by_hand_three_tokens():
    """gamma 0.9, lam 0.8 (gamma lam = 0.72); the 9 and 7 sit on a pad and must be ignored.
    delta_2 = 2 - 1.5 = 0.5 (no bootstrap past the last answer token)        A_2 = 0.5
    delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35                                    A_1 = 0.35 + 0.72 * 0.5 = 0.71
    delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4                                     A_0 = 1.4 + 0.72 * 0.71 = 1.9112
    returns = A + V = [2.4112, 1.71, 2.0, 0]."""
    rewards, values, mask = t([[1.0, 0.0, 2.0, 9.0]]), t([[0.5, 1.0, 1.5, 7.0]]), t([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0, 0.0]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    """gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t. r = [1, 2, 3], V = [1, 1, 1] after a prompt position:
    A = [6 - 1, 5 - 1, 3 - 1] = [5, 4, 2], returns = [6, 5, 3] (reward-to-go)."""
    rewards, values, mask = t([[8.0, 1.0, 2.0, 3.0]]), t([[8.0, 1.0, 1.0, 1.0]]), t([[0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.0, 5.0, 4.0, 2.0]])
    close(ret, [[0.0, 6.0, 5.0, 3.0]])


def gae_loop_reference(rewards, values, mask, gamma, lam):
    """The recursion of the docstring with plain Python floats: each row's answer tokens are taken out of
    the row (the gaps dropped), GAE runs over them as one contiguous episode, and the results go back."""
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        steps = [i for i in range(len(r[b])) if m[b][i]]
        next_a, next_v = 0.0, 0.0
        for i in reversed(steps):
            a = r[b][i] + gamma * next_v - v[b][i] + gamma * lam * next_a
            adv[b][i], ret[b][i] = a, a + v[b][i]
            next_a, next_v = a, v[b][i]
    return t(adv), t(ret)


def test_gae_skips_a_gap_by_hand():
    """The docstring's second example: gamma 0.9, lam 0.8, r = [1, 5, 0, 2], V = [0.5, 9, 1, 1.5], mask
    [1, 0, 1, 1]: the gap at 1 is skipped, so A = [1.9112, 0, 0.71, 0.5], returns = [2.4112, 0, 1.71, 2.0]."""
    adv, ret = gae(t([[1.0, 5.0, 0.0, 2.0]]), t([[0.5, 9.0, 1.0, 1.5]]), t([[1, 0, 1, 1]]), 0.9, 0.8)
    close(adv, [[1.9112, 0.0, 0.71, 0.5]])
    close(ret, [[2.4112, 0.0, 1.71, 2.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_loop_reference(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    mask = ragged_mask()
    rewards = torch.randn(mask.shape, generator=gen, dtype=F64)
    values = torch.randn(mask.shape, generator=gen, dtype=F64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop_reference(rewards, values, mask, gamma, lam)
    close(adv, ref_adv, rtol=1e-12)
    close(ret, ref_ret, rtol=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    assert (adv[3] == 0).all()  # the empty row


# --- whiten ---


def test_whiten_by_hand():
    """x = [1, 2, 3, 100], mask [1, 1, 1, 0]: mean 2, population var (1 + 0 + 1) / 3 = 2/3,
    1 / sqrt(2/3) = 1.224744871391589 -> [-1.2247449, 0, 1.2247449, 0];
    shift_mean=False adds the mean 2 back: [0.775255128608411, 2, 3.224744871391589, 0]."""
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    close(whiten(x, mask, eps=0.0), [[-1.224744871391589, 0.0, 1.224744871391589, 0.0]])
    close(whiten(x, mask), [[-1.224744871391589, 0.0, 1.224744871391589, 0.0]])  # eps 1e-8 is below rtol
    close(whiten(x, mask, shift_mean=False, eps=0.0), [[0.775255128608411, 2.0, 3.224744871391589, 0.0]])


def test_whiten_empty_mask_and_moments():
    assert torch.equal(whiten(t([[1.0, 2.0]]), t([[0, 0]])), t([[0.0, 0.0]]))
    gen = torch.Generator().manual_seed(2)
    mask = ragged_mask()
    w = whiten(torch.randn(mask.shape, generator=gen, dtype=F64), mask, eps=0.0)[mask.bool()]
    close(w.mean(), t(0.0), atol=1e-12)
    close(w.var(unbiased=False), t(1.0))


def test_whiten_with_global_statistics_equals_whole_batch():
    """Two shards whitened with the pooled mean and population variance (as all-reduced sums give them)
    equal the whole batch whitened at once."""
    gen = torch.Generator().manual_seed(6)
    mask = ragged_mask()
    x = torch.randn(mask.shape, generator=gen, dtype=F64)
    values = x[mask.bool()]
    mean, var = values.mean().item(), values.var(unbiased=False).item()
    shards = [whiten(x[rows], mask[rows], mean=mean, var=var) for rows in (slice(0, 3), slice(3, 6))]
    close(torch.cat(shards), whiten(x, mask), rtol=1e-12)
    scaled = whiten(x, mask, mean=mean, var=var, shift_mean=False)
    close(scaled, whiten(x, mask, shift_mean=False), rtol=1e-12)


# --- policy loss ---


def policy_case():
    """Four answer tokens and one masked (garbage) token; see test_policy_loss_by_hand."""
    ratios = t([[1.5, 0.5, 0.5, 1.1, 7.0]])
    old = t([[-1.0, -2.0, -0.3, -1.7, -4.0]])
    return (old + ratios.log()), old, t([[1.0, -1.0, 2.0, -2.0, 5.0]]), t([[1, 1, 1, 1, 0]])


def test_policy_loss_by_hand():
    """eps 0.2; (r, A) -> max(-A r, -A clip(r, 0.8, 1.2)):
    (1.5,  1) -> max(-1.5, -1.2) = -1.2, clipped branch active
    (0.5, -1) -> max( 0.5,  0.8) =  0.8, clipped branch active
    (0.5,  2) -> max(-1.0, -1.6) = -1.0  (r below 1 - eps does not clip when A > 0)
    (1.1, -2) -> max( 2.2,  2.2) =  2.2  (inside the range: a tie, not counted as clipped)
    loss = (-1.2 + 0.8 - 1.0 + 2.2) / 4 = 0.2; clipfrac = 2 / 4; ratio = (1.5 + 0.5 + 0.5 + 1.1) / 4 = 0.9;
    approx_kl = [(0.5 - ln 1.5) + 2 (ln 2 - 0.5) + (0.1 - ln 1.1)] / 4
              = [0.0945348918918356 + 0.3862943611198906 + 0.0046898201956751] / 4 = 0.1213797683018503.
    Gradient wrt log p = d(-A r)/d log p / 4 = -A r / 4 on unclipped tokens, 0 on clipped ones:
    [0, 0, -2 * 0.5 / 4, 2 * 1.1 / 4, 0] = [0, 0, -0.25, 0.55, 0]."""
    lp, old, adv, mask = policy_case()
    lp.requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    close(loss, t(0.2))
    close(stats["clipfrac"], t(0.5))
    close(stats["ratio"], t(0.9))
    close(stats["approx_kl"], t(0.1213797683018503))
    assert not any(s.requires_grad for s in stats.values())
    loss.backward()
    close(lp.grad, [[0.0, 0.0, -0.25, 0.55, 0.0]])
    # A caller's normalizer of 8 (tokens of the whole mini-batch) halves loss and stats.
    loss8, stats8 = policy_loss(lp, old, adv, mask, clip_eps=0.2, normalizer=8)
    close(loss8, t(0.1))
    close(stats8["clipfrac"], t(0.25))


def test_policy_loss_clip_higher_by_hand():
    """eps 0.2, eps_high 0.6 on policy_case: (1.5, 1) -> max(-1.5, -A clip(1.5, 0.8, 1.6) = -1.5) = -1.5, no
    longer clipped; the others as in test_policy_loss_by_hand. loss = (-1.5 + 0.8 - 1.0 + 2.2) / 4 = 0.125,
    clipfrac 1 / 4, and the first token's gradient is back: -A r / 4 = -0.375."""
    lp, old, adv, mask = policy_case()
    lp.requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    close(loss, t(0.125))
    close(stats["clipfrac"], t(0.25))
    loss.backward()
    close(lp.grad, [[-0.375, 0.0, -0.25, 0.55, 0.0]])


def test_policy_loss_dual_clip_by_hand():
    """eps 0.2, C 1.5; (r, A) -> A < 0: min(max(-A r, -A clip(r)), -A C), else max(...):
    (4, -1) -> min(max(4, 1.2), 1.5) = 1.5, dual-clipped (gradient 0)
    (1, -1) -> min(max(1, 1), 1.5)   = 1    (gradient -A r / 3 = 1/3)
    (4,  1) -> max(-4, -1.2)         = -1.2 (A > 0: no dual clip; clipped)
    loss = (1.5 + 1 - 1.2) / 3 = 1.3 / 3; clipfrac 1/3, clipfrac_dual 1/3;
    approx_kl_k1 = -(ln 4 + 0 + ln 4) / 3, approx_kl (k3) = 2 (3 - ln 4) / 3."""
    old = t([[-1.0, -2.0, -3.0]])
    lp = (old + t([[4.0, 1.0, 4.0]]).log()).requires_grad_(True)
    loss, stats = policy_loss(lp, old, t([[-1.0, -1.0, 1.0]]), t([[1, 1, 1]]), clip_eps=0.2, dual_clip=1.5)
    close(loss, t(1.3 / 3))
    close(stats["clipfrac"], t(1 / 3))
    close(stats["clipfrac_dual"], t(1 / 3))
    close(stats["approx_kl_k1"], t(-2 * math.log(4) / 3))
    close(stats["approx_kl"], t(2 * (3 - math.log(4)) / 3))
    loss.backward()
    close(lp.grad, [[0.0, 1 / 3, 0.0]])
    plain, _ = policy_loss(lp, old, t([[-1.0, -1.0, 1.0]]), t([[1, 1, 1]]), clip_eps=0.2)
    close(plain, t(3.8 / 3))  # without the dual clip the first token costs 4


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    """log p == log p_old -> r = 1 -> loss = -mean(A) over the mask = -(1 - 2 + 4) / 3 = -1; no clipping."""
    lp = t([[-0.3, -1.2, -2.0, -5.0]])
    loss, stats = policy_loss(lp, lp.clone(), t([[1.0, -2.0, 4.0, 9.0]]), t([[1, 1, 1, 0]]), clip_eps=0.2)
    close(loss, t(-1.0))
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    close(stats["ratio"], t(1.0))


def test_policy_and_value_loss_micro_batches_add_up_to_full_batch():
    """Two micro-batches with the global normalizer (answer tokens of the whole batch): the losses and the
    accumulated gradients equal the full batch's."""
    gen = torch.Generator().manual_seed(3)
    mask = ragged_mask()

    def randn():
        return torch.randn(mask.shape, generator=gen, dtype=F64)

    lp, old, adv = (0.3 * randn() - 1).requires_grad_(True), 0.3 * randn() - 1, randn()
    v, old_v, ret = randn().requires_grad_(True), randn(), randn()
    full_p, _ = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    full_v, _ = value_loss(v, old_v, ret, mask, clip_eps=0.2)
    (full_p + full_v).backward()
    grads = lp.grad.clone(), v.grad.clone()
    lp.grad, v.grad = None, None
    n = mask.sum().item()
    total_p = total_v = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part_p, _ = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], clip_eps=0.2, normalizer=n)
        part_v, _ = value_loss(v[rows], old_v[rows], ret[rows], mask[rows], clip_eps=0.2, normalizer=n)
        (part_p + part_v).backward()
        total_p, total_v = total_p + part_p.detach(), total_v + part_v.detach()
    close(total_p, full_p.detach(), rtol=1e-12)
    close(total_v, full_v.detach(), rtol=1e-12)
    close(lp.grad, grads[0], rtol=1e-12)
    close(v.grad, grads[1], rtol=1e-12)


def test_policy_loss_rejects_nonpositive_normalizer():
    lp, old, adv, mask = policy_case()
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(lp, old, adv, mask, clip_eps=0.2, normalizer=0)


# --- value loss ---


def test_value_loss_by_hand():
    """eps 0.2; (V, V_old, R) -> V_clip = V_old + clamp(V - V_old, +-0.2), (V - R)^2, (V_clip - R)^2:
    (1.0, 0.5,  1.0) -> 0.7, 0,    0.09  clipped term larger
    (0.0, 0.1, -1.0) -> 0.0, 1,    1     (V - V_old inside the range)
    (2.0, 1.0,  3.0) -> 1.2, 1,    3.24  clipped term larger
    (0.5, 1.0,  2.0) -> 0.8, 2.25, 1.44
    loss = 0.5 (0.09 + 1 + 3.24 + 2.25) / 4 = 0.8225, vf_clipfrac = 2 / 4.
    Unclipped: 0.5 (0 + 1 + 1 + 2.25) / 4 = 0.53125. The fifth (masked) token is garbage."""
    v, old = t([[1.0, 0.0, 2.0, 0.5, 50.0]]), t([[0.5, 0.1, 1.0, 1.0, -9.0]])
    ret = t([[1.0, -1.0, 3.0, 2.0, 4.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(v, old, ret, mask, clip_eps=0.2)
    close(loss, t(0.8225))
    close(stats["vf_clipfrac"], t(0.5))
    loss, stats = value_loss(v, old, ret, mask, clip_eps=None)
    close(loss, t(0.53125))
    assert stats["vf_clipfrac"].item() == 0.0


# --- masked-position invariance ---


def test_masked_positions_never_change_answer_outputs():
    """Random values on mask == 0 positions give bit-identical outputs on answer positions."""
    gen = torch.Generator().manual_seed(4)
    mask = ragged_mask()
    keep = mask.bool()
    xs = [torch.randn(mask.shape, generator=gen, dtype=F64) for _ in range(6)]
    noisy = [garbage_off_mask(x, mask, seed=10 + i) for i, x in enumerate(xs)]
    assert not torch.equal(xs[0], noisy[0])
    scores = t([1.0, -2.0, 3.0, 4.0, 0.5, -1.5])

    def outputs(a, b, c, d, e, f, m):
        adv, ret = gae(a, b, m, 0.99, 0.95)
        pl, ps = policy_loss(c, d, e, m, clip_eps=0.2)
        vl, vs = value_loss(b, f, a, m, clip_eps=0.2)
        per_token = [adv, ret, shaped_rewards(scores, a, m, 0.1, 5.0), whiten(a, m)]
        return [x[keep] for x in per_token] + [pl, vl, sequence_kl(a, m), *ps.values(), *vs.values()]

    for m in (mask, mask.bool()):
        for clean, dirty in zip(outputs(*xs, m), outputs(*noisy, m)):
            assert torch.equal(clean, dirty)


def test_masked_inf_and_nan_do_not_leak_into_gradients():
    lp, old, adv, mask = policy_case()
    lp = lp.clone()
    lp[0, 4], old[0, 4], adv[0, 4] = float("nan"), float("-inf"), float("inf")
    lp.requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    close(loss.detach(), t(0.2))
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 4].item() == 0.0


# --- entropy ---


def test_entropy_by_hand():
    """Uniform logits over V = 5 -> ln 5; logits ln [2, 1, 1] -> p [1/2, 1/4, 1/4] ->
    0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; [100, 0, 0] -> 2 e^-100 (100 + ...) ~ 7.4e-42, i.e. 0;
    a filtered -inf logit adds nothing: [0, 0, -inf] -> ln 2 with a finite gradient."""
    close(entropy_from_logits(torch.zeros(2, 3, 5, dtype=F64)), torch.full((2, 3), math.log(5.0), dtype=F64))
    close(entropy_from_logits(t([[[math.log(2.0), 0.0, 0.0]]])), [[1.5 * math.log(2.0)]])
    assert entropy_from_logits(t([[[100.0, 0.0, 0.0]]])).abs().item() < 1e-30
    logits = t([[[0.0, 0.0, float("-inf")]]]).requires_grad_(True)
    h = entropy_from_logits(logits)
    close(h.detach(), [[math.log(2.0)]])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # bf16 logits are computed in float32: uniform over 4 -> ln 4 to float32 precision.
    h16 = entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16))
    assert h16.dtype == torch.float32 and abs(h16.item() - math.log(4.0)) < 1e-6


# --- explained variance ---


def test_explained_variance_by_hand():
    """R = [1, 2, 3], V = [0.5, 2, 2.5], a fourth token masked with garbage: Var[R] = 2/3,
    R - V = [0.5, 0, 0.5] with mean 1/3 and Var = ((1/6)^2 + (1/3)^2 + (1/6)^2) / 3 = 1/18,
    so 1 - (1/18) / (2/3) = 11/12 = 0.9166666666666666. A perfect critic (V = R) gives 1; a constant
    V = 2 gives Var[R - V] = Var[R], so 0. moment_sums: count 3, sum 6, sum of squares 1 + 4 + 9 = 14."""
    ret, mask = t([[1.0, 2.0, 3.0, 4.0]]), t([[1, 1, 1, 0]])
    close(explained_variance(t([[0.5, 2.0, 2.5, float("nan")]]), ret, mask), t(0.9166666666666666))
    close(explained_variance(ret, ret, mask), t(1.0))
    close(explained_variance(t([[2.0, 2.0, 2.0, 2.0]]), ret, mask), t(0.0), atol=1e-15)
    close(moment_sums(ret, mask), [3.0, 6.0, 14.0])


def test_explained_variance_undefined_without_return_variance():
    """Var[R] == 0 (equal returns, even ones whose float sums do not cancel exactly) or no answer token: NaN."""
    assert math.isnan(explained_variance(t([[0.0, 1.0, 5.0]]), t([[0.1, 0.1, 0.1]]), t([[1, 1, 1]])).item())
    assert math.isnan(explained_variance(t([[0.0, 1.0]]), t([[0.0, 0.0]]), t([[1, 1]])).item())
    assert math.isnan(explained_variance(t([[1.0, 2.0]]), t([[3.0, 4.0]]), t([[0, 0]])).item())


def test_explained_variance_from_shard_sums_equals_whole_batch():
    """Moment sums added over shards (as an all-reduce adds them over processes) give the whole batch's value."""
    gen = torch.Generator().manual_seed(8)
    mask = ragged_mask()
    values, returns = (torch.randn(mask.shape, generator=gen, dtype=F64) for _ in range(2))
    shards = (slice(0, 2), slice(2, 6))
    return_sums = sum(moment_sums(returns[rows], mask[rows]) for rows in shards)
    residual_sums = sum(moment_sums(returns[rows] - values[rows], mask[rows]) for rows in shards)
    close(explained_variance_from_sums(return_sums, residual_sums), explained_variance(values, returns, mask),
          rtol=1e-12)


# --- KL controllers ---


def test_adaptive_kl_controller_by_hand_and_state_round_trip():
    """beta 0.2, target 6, horizon 10000:
    update(9, 500):    e = clip(9/6 - 1 = 0.5) = 0.2   -> 0.2 * (1 + 0.2 * 0.05) = 0.202
    update(5.7, 1000): e = 5.7/6 - 1 = -0.05           -> 0.202 * (1 - 0.05 * 0.1) = 0.20099
    update(3, 2000):   e = clip(3/6 - 1 = -0.5) = -0.2 -> 0.20099 * (1 - 0.2 * 0.2) = 0.1929504"""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    for kl, n, expected in [(9.0, 500, 0.202), (5.7, 1000, 0.20099), (3.0, 2000, 0.1929504)]:
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    restored.update(6.0, 1000)  # e = 0: unchanged
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.05


# --- running moments ---


def test_running_moments_by_hand():
    """[1, 2] then [3, 4]: count 4, mean 2.5, sample var ((1.5^2 + 0.5^2) * 2) / 3 = 5/3,
    std 1.2909944487358056; normalize(4) = 1.5 / 1.2909944487358056 = 1.161895003862225."""
    rm = RunningMoments()
    assert rm.std == 0.0
    rm.update(t([1.0, 2.0]))
    rm.update(t([3.0, 4.0]))
    assert rm.count == 4 and rm.mean == pytest.approx(2.5, rel=1e-15)
    assert rm.std == pytest.approx(1.2909944487358056, rel=1e-12)
    close(rm.normalize(t([4.0])), [1.161895003862225])
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(rm.state_dict())))
    assert (restored.count, restored.mean, restored.std) == (rm.count, rm.mean, rm.std)


def test_running_moments_pieces_equal_concatenation():
    gen = torch.Generator().manual_seed(5)
    data = 3.0 + 2.0 * torch.randn(101, generator=gen, dtype=F64)
    rm = RunningMoments()
    for piece in (data[:1], data[1:40], data[40:40], data[40:]):
        rm.update(piece)
    assert rm.count == 101
    assert rm.mean == pytest.approx(data.mean().item(), rel=1e-12)
    assert rm.std == pytest.approx(data.std().item(), rel=1e-12)


def test_aggregation_weights_by_hand():
    """tokens 4, answers 2, answer lengths [1, 3] (see aggregation_weights)."""
    from chatrlhf.algorithms.losses import aggregation_weights

    mask = t([[1, 0, 0], [1, 1, 1]])
    close(aggregation_weights(mask, "token-mean", 4, 2, 8), mask)
    close(aggregation_weights(mask, "seq-mean-token-mean", 4, 2, 8), [[2.0, 0, 0], [2 / 3, 2 / 3, 2 / 3]])
    close(aggregation_weights(mask, "seq-mean-token-sum", 4, 2, 8), mask * 2)
    close(aggregation_weights(mask, "seq-mean-token-sum-norm", 4, 2, 8), mask * 0.25)
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq-sum'"):
        aggregation_weights(mask, "seq-sum", 4, 2, 8)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregated_policy_loss_equals_the_direct_formula_and_adds_up_over_micro_batches(mode):
    """At ratio 1 the per-token loss is -A: policy_loss with aggregation_weights gives the mode's formula
    computed directly, and two micro-batches with the mini-batch's counts add up to it."""
    from chatrlhf.algorithms.losses import aggregation_weights

    gen = torch.Generator().manual_seed(5)
    mask = ragged_mask()
    adv = torch.randn(mask.shape, generator=gen, dtype=F64)
    lp = torch.randn(mask.shape, generator=gen, dtype=F64)
    tokens, answers, max_len = float(mask.sum()), float(mask.shape[0]), 11
    per_answer = (-adv * mask).sum(-1)
    direct = {"seq-mean-token-mean": (per_answer / mask.sum(-1).clamp(min=1)).mean(),
              "seq-mean-token-sum": per_answer.mean(), "seq-mean-token-sum-norm": per_answer.mean() / max_len}[mode]
    w = aggregation_weights(mask, mode, tokens, answers, max_len)
    full, _ = policy_loss(lp, lp.detach(), adv, mask, clip_eps=0.2, normalizer=tokens, weights=w)
    close(full, direct)
    parts = sum(policy_loss(lp[r], lp[r].detach(), adv[r], mask[r], clip_eps=0.2, normalizer=tokens,
                            weights=aggregation_weights(mask[r], mode, tokens, answers, max_len))[0]
                for r in (slice(0, 2), slice(2, None)))
    close(parts, direct)


def test_k3_plus_has_k3_value_and_k2_gradient():
    """log p = [-1, -2], log q = [-2, -1]: value [e^-1, e - 2] (k3); gradient wrt log p = log p - log q = [1, -1]
    (k2's), where k3's own gradient would be 1 - e^d = [1 - e^-1, 1 - e]."""
    from chatrlhf.algorithms.rl import KL_ESTIMATORS, kl_estimate

    lp = t([-1.0, -2.0]).requires_grad_(True)
    value = KL_ESTIMATORS["k3+"](lp, t([-2.0, -1.0]))
    close(value, [math.exp(-1), math.e - 2])
    value.sum().backward()
    close(lp.grad, [1.0, -1.0])
    close(kl_estimate("k1", t([-1.0, -30.0]), t([-2.0, -1.0]), clamp=10), [1.0, -10.0])
    close(kl_estimate("k1", t([-1.0, -30.0]), t([-2.0, -1.0])), [1.0, -29.0])


def test_policy_loss_sequence_ratio_by_hand():
    """GSPO: token ratios [2, 1] (and a masked token) -> both tokens take sqrt 2 = 1.41421356; A 1.
    eps 0.2: max(-1.414, -1.2) = -1.2 on both, clipped, gradient 0. eps_high 0.5: unclipped, loss -sqrt 2,
    and d loss / d log p_t = -A sqrt 2 / 2 on each token (r_t = sg[seq] + log p_t - sg[log p_t])."""
    old = t([[-1.0, -2.0, -3.0]])
    lp = (old + t([[2.0, 1.0, 5.0]]).log()).requires_grad_(True)
    adv, mask = t([[1.0, 1.0, 1.0]]), t([[1, 1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2, sequence_ratio=True)
    close(loss, t(-1.2))
    close(stats["ratio"], t(math.sqrt(2)))
    close(stats["clipfrac"], t(1.0))
    loss.backward()
    close(lp.grad, [[0.0, 0.0, 0.0]])
    lp.grad = None
    loss, _ = policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.5, sequence_ratio=True)
    close(loss, t(-math.sqrt(2)))
    loss.backward()
    close(lp.grad, [[-math.sqrt(2) / 2, -math.sqrt(2) / 2, 0.0]])


@pytest.mark.parametrize(("of", "beta"), [("answer", 0.1), ("token", 0.1 * (1 - 0.2 * 2 / 10))])
def test_adaptive_kl_is_fed_the_answer_or_the_token_mean(of, beta):
    """k1 0.5 on each of 4 answer tokens, answers of 3 and 1 tokens: answer KLs [1.5, 0.5], mean 1.0; token
    mean 2.0 / 4 = 0.5. Target 1, horizon 10, 2 answers: fed 1.0, e = 0 and beta stays 0.1; fed 0.5,
    e = clip(-0.5) = -0.2 and beta = 0.1 (1 - 0.2 * 2 / 10) = 0.096. The logged KL is the answer mean either way."""
    from types import SimpleNamespace

    from chatrlhf.algorithms.rl import AdaptiveKLController
    from chatrlhf.stages.ppo import _adapt_kl

    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    old = t([[-1.0, -1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    run = SimpleNamespace(world=1, actor=SimpleNamespace(all_reduce=lambda x: x), cfg=SimpleNamespace(kl_target_of=of),
                          kl_ctl=AdaptiveKLController(0.1, 1.0, 10))
    kl, used = _adapt_kl(run, SimpleNamespace(old_logprobs=old, ref_logprobs=old - 0.5 * mask, mask=mask))
    assert kl == pytest.approx(1.0) and used == 0.1 and run.kl_ctl.value == pytest.approx(beta)


def test_grpo_does_not_clip_rewards_by_default_and_ppo_does():
    from chatrlhf.stages.ppo_config import GRPOConfig, PPOConfig

    assert GRPOConfig().reward_clip is None and PPOConfig().reward_clip == 5.0


def test_overlong_penalty_by_hand():
    """max_len 10, buffer 4, factor 1: free up to 6 tokens, then -1/4 per token: [3, 6, 8, 10] -> [0, 0, -0.5, -1];
    factor 0.5 halves it."""
    from chatrlhf.algorithms.rl import overlong_penalty

    lengths = torch.tensor([3, 6, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == [0.0, 0.0, -0.25, -0.5]
