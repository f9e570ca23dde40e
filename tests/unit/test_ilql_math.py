"""ILQL math against hand-computed values (worked out in each comment), plus micro-batch invariance and the
gradient paths the objective must cut."""

import math

import pytest
import torch

from chatrlhf.algorithms.ilql import (
    cql_loss,
    expectile_loss,
    ilql_logits,
    ilql_losses,
    polyak_update,
    q_td_loss,
    td_targets,
    terminal_rewards,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def test_expectile_loss_by_hand():
    # tau 0.7: diff +2 -> 0.7 * 4 = 2.8; diff -2 -> 0.3 * 4 = 1.2; tau 0.5 is half the squared error: 3 -> 4.5
    torch.testing.assert_close(expectile_loss(t([2.0, -2.0]), 0.7), t([2.8, 1.2]), rtol=1e-12, atol=0)
    torch.testing.assert_close(expectile_loss(t([3.0, -3.0]), 0.5), t([4.5, 4.5]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(t([1.0]), 1.0)


def test_td_targets_by_hand():
    # gamma 0.5. Row 0: answer starts at column 1, ends at 2, padding at 3:
    #   t0 off the mask -> 0; t1: 0 + 0.5 * V2 = 1; t2: next is padding -> 3 + 0; t3 off -> 0.
    # Row 1: answer fills the row: [0 + 0.5*6, 0 + 0.5*8, 0 + 0.5*10, 2 + 0 (no next column)] = [3, 4, 5, 2].
    # Row 2: non-contiguous mask [1, 0, 1, 1]: t0's next is off the mask -> 1 + 0 (its NaN value is never read);
    #   t1 off -> 0; t2: 0 + 0.5 * 4 = 2; t3: 2.
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]])
    rewards = t([[0, 0, 3, 0], [0, 0, 0, 2], [1, 0, 0, 2]])
    values = t([[9, 1, 2, 7], [4, 6, 8, 10], [5, math.nan, 3, 4]]).requires_grad_()
    got = td_targets(rewards, values, mask, gamma=0.5)
    torch.testing.assert_close(got, t([[0, 1, 3, 0], [3, 4, 5, 2], [1, 0, 2, 2]]), rtol=1e-12, atol=0)
    assert not got.requires_grad  # targets are constants for the Q loss


def test_q_td_loss_by_hand():
    # (2 - 1)^2 + (1 - 3)^2 = 5 over 2 answer actions -> 2.5; the third (off the mask, error 100) is ignored;
    # with the optimizer step's count 5 -> 1.0
    q, y, mask = t([[2.0, 1.0, 10.0]]), t([[1.0, 3.0, 0.0]]), torch.tensor([[1, 1, 0]])
    assert q_td_loss(q, y, mask).item() == pytest.approx(2.5, rel=1e-12)
    assert q_td_loss(q, y, mask, num_tokens=5).item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="num_tokens"):
        q_td_loss(q, y, mask, num_tokens=0)


def test_cql_loss_by_hand():
    # V = 3. Q = ln [1, 2, 3], a = 1: logsumexp ln 6 - ln 2 = ln 3. Q = ln [1, 1, 2], a = 2: ln 4 - ln 2 = ln 2.
    q_all = t([[[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]]]).log()
    actions = torch.tensor([[1, 2]])
    both = cql_loss(q_all, actions, torch.tensor([[1, 1]]))
    assert both.item() == pytest.approx(math.log(6) / 2, rel=1e-12)  # (ln 3 + ln 2) / 2 = 0.8958797346140275
    first = cql_loss(q_all, actions, torch.tensor([[1, 0]]))
    assert first.item() == pytest.approx(math.log(3), rel=1e-12)
    assert cql_loss(q_all, actions, torch.tensor([[1, 1]]), num_tokens=4).item() == pytest.approx(math.log(6) / 4)


def _tiny_example():
    """One row, two actions, V = 2, two Q heads (the ilql_losses docstring example)."""
    qs = [t([[[2.0, 0.0], [0.0, 1.0]]]).requires_grad_(), t([[[1.0, 1.0], [3.0, 0.0]]]).requires_grad_()]
    target_qs = [t([[[3.0, 0.0], [0.0, 4.0]]]).requires_grad_(), t([[[0.5, 0.0], [0.0, 2.0]]]).requires_grad_()]
    v = t([[1.0, 2.0]]).requires_grad_()
    batch = dict(actions=torch.tensor([[0, 1]]), rewards=t([[0.0, 1.0]]), mask=torch.tensor([[1, 1]]))
    return qs, target_qs, v, batch


def test_ilql_losses_by_hand():
    # targets y = [0 + 0.5 * V(s1), 1 + 0] = [1, 1]; Q_1 takes [2, 1], Q_2 takes [1, 0]
    # q = ((2-1)^2 + (1-1)^2 + (1-1)^2 + (0-1)^2) / 2 = 1
    # target heads take [3, 4] and [0.5, 2] -> min [0.5, 2]; diff = min - V = [-0.5, 0]; v = 0.3 * 0.25 / 2
    # cql = (ln(1+e^-2) + ln(1+e^-1) + ln 2 + ln(1+e^3)) / 2 = 2.090962115347441
    qs, target_qs, v, batch = _tiny_example()
    out = ilql_losses(qs, target_qs, v, **batch, gamma=0.5, tau=0.7, cql_scale=0.1)
    cql = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(3))) / 2
    expected = {"q": 1.0, "v": 0.0375, "cql": cql, "total": 1.0 + 0.0375 + 0.1 * cql,
                "q_mean": 1.0, "v_mean": 1.5, "target_q_mean": 1.25}
    for name, value in expected.items():
        assert getattr(out, name).item() == pytest.approx(value, rel=1e-12), name
    assert out.total.item() == pytest.approx(1.2465962115347442, rel=1e-12)


def test_ilql_losses_gradient_paths():
    # V gets no gradient from the TD loss; the Q heads none from the V loss; the target heads none at all
    qs, target_qs, v, batch = _tiny_example()
    out = ilql_losses(qs, target_qs, v, **batch, gamma=0.5, tau=0.7, cql_scale=0.1)
    assert torch.autograd.grad(out.q, [v], allow_unused=True) == (None,)
    assert torch.autograd.grad(out.v, qs, allow_unused=True, retain_graph=True) == (None, None)
    assert torch.autograd.grad(out.total, target_qs, allow_unused=True, retain_graph=True) == (None, None)
    # and the paths that must exist do: dv of v = (0.3 * 2 * (v - min Q)) / 2 at t0 = 0.3 * 2 * 0.5 / 2 = 0.15
    (grad_v,) = torch.autograd.grad(out.v, [v], retain_graph=True)
    torch.testing.assert_close(grad_v, t([[0.15, 0.0]]), rtol=1e-12, atol=0)
    # dq/dQ_1(s0, a0) = 2 (2 - 1) / 2 = 1
    assert torch.autograd.grad(out.q, qs[0])[0][0, 0, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_ilql_losses_micro_batches_sum_to_the_full_batch():
    # 4 rows, answers starting and ending at different columns; with num_tokens fixed to the whole batch's
    # answer-action count, the two halves' losses add up to the full batch's
    gen = torch.Generator().manual_seed(0)
    B, T1, V = 4, 6, 5
    qs = [torch.randn(B, T1, V, generator=gen, dtype=D) for _ in range(2)]
    target_qs = [torch.randn(B, T1, V, generator=gen, dtype=D) for _ in range(2)]
    v = torch.randn(B, T1, generator=gen, dtype=D)
    actions = torch.randint(0, V, (B, T1), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    rewards = torch.zeros(B, T1, dtype=D)
    rewards[torch.arange(B), torch.tensor([3, 5, 4, 5])] = torch.randn(B, generator=gen, dtype=D)
    kw = dict(gamma=0.9, tau=0.7, cql_scale=0.5, num_tokens=mask.sum())
    full = ilql_losses(qs, target_qs, v, actions, rewards, mask, **kw)
    halves = [ilql_losses([q[rows] for q in qs], [q[rows] for q in target_qs], v[rows], actions[rows],
                          rewards[rows], mask[rows], **kw) for rows in (slice(0, 2), slice(2, 4))]
    for name in ("total", "q", "v", "cql"):
        torch.testing.assert_close(getattr(halves[0], name) + getattr(halves[1], name), getattr(full, name),
                                   rtol=1e-12, atol=0)
    # num_tokens None is the batch's own masked mean: the full batch's count is 3 + 6 + 2 + 4 = 15
    assert mask.sum().item() == 15
    own = ilql_losses(qs, target_qs, v, actions, rewards, mask, gamma=0.9, tau=0.7, cql_scale=0.5)
    torch.testing.assert_close(own.total, full.total, rtol=1e-12, atol=0)


def test_polyak_update_by_hand():
    # alpha 0.25: 0.75 * [1, 2] + 0.25 * [5, -2] = [2, 1]; the online tensor is left alone
    target, online = t([1.0, 2.0]), t([5.0, -2.0])
    other_target, other_online = t([[0.0]]), t([[4.0]])
    polyak_update([target, other_target], [online, other_online], 0.25)
    assert torch.equal(target, t([2.0, 1.0]))
    assert torch.equal(other_target, t([[1.0]]))
    assert torch.equal(online, t([5.0, -2.0]))
    # alpha 1 copies exactly, even values whose difference rounds
    target, online = t([0.1, 1e16]), t([0.3, 1.0])
    polyak_update(iter([target]), iter([online]), 1.0)
    assert torch.equal(target, online)
    with pytest.raises(ValueError):
        polyak_update([target], [online, online], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        polyak_update([target], [online], 1.5)


def test_ilql_logits_by_hand():
    # beta 2: logits [0, ln 3] -> log_softmax [ln 1/4, ln 3/4]; Q [1, 0], V 0.5 -> 2 (Q - V) = [1, -1]
    logits, q, v = t([[0.0, math.log(3)]]), t([[1.0, 0.0]]), t([0.5])
    got = ilql_logits(logits, q, v, beta=2.0)
    expected = t([[math.log(0.25) + 1, math.log(0.75) - 1]])  # [-0.3862943611198906, -1.2876820724517808]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # (B, T, V) with V (B, T): the same numbers at every position
    got3 = ilql_logits(logits[:, None].expand(1, 3, 2), q[:, None].expand(1, 3, 2), v[:, None].expand(1, 3), 2.0)
    torch.testing.assert_close(got3, expected[:, None].expand(1, 3, 2), rtol=1e-12, atol=0)


def test_ilql_logits_beta_zero_is_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits, q, v = (torch.randn(2, 3, 7, generator=gen, dtype=D), torch.randn(2, 3, 7, generator=gen, dtype=D),
                    torch.randn(2, 3, generator=gen, dtype=D))
    assert torch.equal(ilql_logits(logits, q, v, beta=0.0), torch.log_softmax(logits, dim=-1))


def test_terminal_rewards_by_hand():
    # row 0's answer ends at action 2 (before padding), row 1's at the last column; row 2 has no answer action
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards = terminal_rewards(torch.tensor([2.0, 5.0, 7.0], dtype=torch.float64), mask)
    expected = torch.tensor([[0, 0, 2, 0], [0, 0, 0, 5], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(rewards, expected)
