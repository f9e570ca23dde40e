"""The peer-name map of docs/rl.md, row by row: each peer's loss or estimator, written here from its published
definition, against the chatrlhf functions its flags select, on the same random tensors (float64)."""

import math

import pytest
import torch

from chatrlhf.algorithms.advantages import grpo_advantages, rloo_advantages
from chatrlhf.algorithms.losses import aggregation_weights, policy_loss
from chatrlhf.algorithms.rl import KL_ESTIMATORS, kl_estimate, whiten

F64 = torch.float64


def batch(seed: int = 0, b: int = 6, t: int = 9):
    """log p, log p_old, log p_ref, advantages (B, T) and a ragged right-padded mask (every row non-empty)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3
    lp = old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64).unsqueeze(-1).expand(b, t).clone()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t) < lengths.unsqueeze(-1)).to(F64)
    return lp, old, ref, adv, mask


def clipped(lp, old, adv, low, high):
    r = torch.exp(lp - old)
    return torch.maximum(-adv * r, -adv * r.clamp(1 - low, 1 + high))


def ours(lp, old, adv, mask, mode, max_len=None, **kw):
    tokens, answers = float(mask.sum()), float(mask.shape[0])
    w = aggregation_weights(mask, mode, tokens, answers, max_len or mask.shape[1])
    return policy_loss(lp, old, adv, mask, normalizer=tokens, weights=w, **kw)[0]


def test_trl_grpo_loss_type_is_seq_mean_token_mean():
    """TRL GRPOTrainer loss_type="grpo": mean over completions of (sum_t l_t m_t / sum_t m_t), with
    epsilon_high: `chatrlhf grpo --loss_agg seq-mean-token-mean --clip_eps_high`."""
    lp, old, _, adv, mask = batch(1)
    per_token = clipped(lp, old, adv, 0.2, 0.28)
    trl = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(ours(lp, old, adv, mask, "seq-mean-token-mean", clip_eps=0.2, clip_eps_high=0.28), trl)


@pytest.mark.parametrize("peer", ["trl bnpo / dapo", "verl token-mean", "openrlhf"])
def test_token_mean_is_the_default(peer):
    """TRL loss_type bnpo and dapo, verl loss_agg_mode=token-mean, OpenRLHF's PolicyLoss: sum l m / sum m."""
    lp, old, _, adv, mask = batch(2)
    ref = (clipped(lp, old, adv, 0.2, 0.2) * mask).sum() / mask.sum()
    torch.testing.assert_close(policy_loss(lp, old, adv, mask, 0.2)[0], ref)


def test_trl_dr_grpo_loss_type_is_seq_mean_token_sum_norm():
    """TRL loss_type="dr_grpo": sum l m / (completions x max_completion_length)."""
    lp, old, _, adv, mask = batch(3)
    trl = (clipped(lp, old, adv, 0.2, 0.2) * mask).sum() / (mask.shape[0] * 16)
    torch.testing.assert_close(ours(lp, old, adv, mask, "seq-mean-token-sum-norm", max_len=16, clip_eps=0.2), trl)


def test_verl_seq_mean_token_sum():
    lp, old, _, adv, mask = batch(4)
    verl = (clipped(lp, old, adv, 0.2, 0.2) * mask).sum(1).mean()
    torch.testing.assert_close(ours(lp, old, adv, mask, "seq-mean-token-sum", clip_eps=0.2), verl)


def test_verl_dual_clip():
    """verl compute_policy_loss with clip_ratio_c 3: where A < 0, min(-A c, max(-A r, -A clip(r)))."""
    lp, old, _, adv, mask = batch(5)
    lp = old + torch.where(adv < 0, 2.0, 0.0) + (lp - old)  # push some negative-advantage ratios past 3
    base = clipped(lp, old, adv, 0.2, 0.2)
    verl = torch.where(adv < 0, torch.minimum(-adv * 3.0, base), base)
    want = (verl * mask).sum() / mask.sum()
    got, stats = policy_loss(lp, old, adv, mask, 0.2, dual_clip=3.0)
    torch.testing.assert_close(got, want)
    assert stats["clipfrac_dual"] > 0


def test_verl_gspo_sequence_ratio():
    """verl loss_mode=gspo: log s_i = mean_t (log p - log p_old) over the answer, every token of the answer
    takes s_i, seq-mean-token-mean aggregation; the gradient per token is that of s_i A."""
    lp, old, _, adv, mask = batch(6)
    lp = lp.clone().requires_grad_(True)
    seq = ((lp - old) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    s = torch.exp(lp - lp.detach() + seq.detach())
    per_token = torch.maximum(-adv * s, -adv * s.clamp(1 - 3e-4, 1 + 4e-4))
    verl = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    got = ours(lp, old, adv, mask, "seq-mean-token-mean", clip_eps=3e-4, clip_eps_high=4e-4, sequence_ratio=True)
    torch.testing.assert_close(got, verl)
    (g_want,) = torch.autograd.grad(verl, lp)
    (g_got,) = torch.autograd.grad(ours(lp, old, adv, mask, "seq-mean-token-mean", clip_eps=3e-4, clip_eps_high=4e-4,
                                        sequence_ratio=True), lp)
    torch.testing.assert_close(g_got, g_want)


def test_verl_low_var_kl_is_clamped_k3_and_k3_plus():
    """verl kl_loss_type low_var_kl: k3 clamped to [-10, 10]; k3+: k3's value with k2's gradient."""
    lp, _, ref, _, _ = batch(7)
    lp = lp.clone()
    lp[0, 0] = ref[0, 0] - 5.0  # a token far below the reference: k3 = e^5 - 5 - 1 > 10
    kl = ref - lp
    verl = (torch.exp(kl) - kl - 1).clamp(-10, 10)
    torch.testing.assert_close(kl_estimate("k3", lp, ref, clamp=10), verl)
    assert kl_estimate("k3", lp, ref)[0, 0] > 10
    x = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(KL_ESTIMATORS["k3+"](x, ref).sum(), x)
    torch.testing.assert_close(g, lp - ref)


def test_openrlhf_reinforce_baseline_is_rloo_whitened():
    """OpenRLHF --advantage_estimator reinforce_baseline (KL in the loss): R - group mean, then whitened over
    the answer tokens. chatrlhf: --advantage_estimator rloo --whiten_advantages true --kl_in loss (RLOO's
    k / (k - 1) factor cancels in the whitening)."""
    g = torch.Generator().manual_seed(8)
    k, groups, t = 4, 3, 5
    scores = torch.randn(k * groups, generator=g, dtype=F64)
    mask = (torch.arange(t) < torch.randint(1, t + 1, (k * groups,), generator=g).unsqueeze(-1)).to(F64)
    rewards = torch.zeros(k * groups, t, dtype=F64)
    rewards[torch.arange(k * groups), mask.sum(1).long() - 1] = scores  # the score on the last answer token
    centred = (scores.view(groups, k) - scores.view(groups, k).mean(-1, keepdim=True)).reshape(-1)
    openrlhf = whiten(centred.unsqueeze(-1) * mask, mask)
    adv, _ = rloo_advantages(rewards, mask, None, k, 1.0, 1.0)
    torch.testing.assert_close(whiten(adv, mask), openrlhf)


def test_grpo_group_norm_uses_bessel_std():
    """TRL, verl (adv_estimator=grpo) and OpenRLHF (group_norm): (R - mean) / (std + eps), torch.std's
    Bessel-corrected std; chatrlhf's eps is TRL's 1e-4 (verl 1e-6: a relative difference below 1e-4 / std)."""
    scores = torch.tensor([1.0, 2.0, 6.0, 3.0], dtype=F64)
    mask = torch.ones(4, 1, dtype=F64)
    adv, _ = grpo_advantages(scores.unsqueeze(-1), mask, None, 4, 1.0, 1.0)
    want = (scores - scores.mean()) / (scores.std() + 1e-4)
    torch.testing.assert_close(adv.squeeze(-1), want)
    assert abs(float(scores.std()) - math.sqrt(14 / 3)) < 1e-12


def test_verl_dapo_filter_groups_keeps_groups_with_nonzero_std():
    """verl's DAPO recipe (``algorithm.filter_groups``): per prompt, the std (numpy's, population) of its answers'
    metric; a prompt is kept when that std is > 0 (or it has one answer, which chatrlhf refuses). On scores
    whose group mean is exact, as 0/1 accuracies and the dyadic values here, that is chatrlhf's "not all
    equal"; with other floats verl's mean can round so an all-equal group gets a std of ~1e-17 and is kept."""
    import numpy as np

    from chatrlhf.algorithms.dynamic_sampling import informative_groups

    g = torch.Generator().manual_seed(0)
    k, groups = 4, 64
    scores = torch.randint(0, 3, (groups, k), generator=g).to(F64) / 2  # {0, 0.5, 1}
    scores[::3] = scores[::3, :1]  # every third group all equal
    verl = [float(np.std(row)) > 0 for row in scores.numpy()]
    assert informative_groups(scores.reshape(-1), k).tolist() == verl
    assert 0 < sum(verl) < groups
