"""DPO-family losses and the sequence log-probs they take, against hand-computed values (worked out in each
comment)."""

import math

import pytest
import torch

from chatrlhf.algorithms import answer_mask, sequence_log_probs
from chatrlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    dpo_sigmoid,
    implicit_rewards,
    ipo,
    kto,
    kto_reference_point,
    preference_logits,
)

D = torch.float64


def test_preference_logits_by_hand():
    # (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; second pair: (0 - 0) - (-1 - -1) = 0
    h = preference_logits(torch.tensor([-1.0, 0.0], dtype=D), torch.tensor([-3.0, -1.0], dtype=D),
                          torch.tensor([-2.0, 0.0], dtype=D), torch.tensor([-2.0, -1.0], dtype=D))
    assert torch.equal(h, torch.tensor([2.0, 0.0], dtype=D))


def test_dpo_sigmoid_by_hand():
    # beta 0.5: z = [1, 0]; -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286; -log sigmoid(0) = ln 2
    loss = dpo_sigmoid(torch.tensor([2.0, 0.0], dtype=D), beta=0.5)
    expected = torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0)], dtype=D)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_cdpo_label_smoothing_by_hand():
    # eps 0.1, z = 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
    loss = dpo_sigmoid(torch.tensor([2.0], dtype=D), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.41326168751822284, rel=1e-12)


def test_ipo_by_hand():
    # beta 0.5 -> target 1 / (2 * 0.5) = 1: h = [2, 0, 1] -> [1, 1, 0]
    loss = ipo(torch.tensor([2.0, 0.0, 1.0], dtype=D), beta=0.5)
    assert torch.equal(loss, torch.tensor([1.0, 1.0, 0.0], dtype=D))


def test_dpo_gradient_pushes_the_margin_up():
    # d/dh -log sigmoid(beta h) = -beta * sigmoid(-beta h): at h = 0, beta 0.5 -> -0.25
    h = torch.zeros(1, dtype=D, requires_grad=True)
    dpo_sigmoid(h, beta=0.5).sum().backward()
    assert h.grad.item() == pytest.approx(-0.25, rel=1e-12)


def test_table_and_implicit_rewards():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo"}
    # 0.1 * (-1 - -3) = 0.2
    r = implicit_rewards(torch.tensor([-1.0], dtype=D), torch.tensor([-3.0], dtype=D), beta=0.1)
    assert r.item() == pytest.approx(0.2, rel=1e-12)


def test_answer_mask_by_hand():
    # row 0: prompt 2 of 4 real tokens -> answer at 2, 3 (the EOS is the last real token); row 1: prompt 1 of 3
    # real tokens, then padding -> 1, 2 only, even if the pad id equals the EOS id (the mask never reads ids)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = answer_mask(mask, torch.tensor([2, 1]))
    assert got.tolist() == [[False, False, True, True, False], [False, True, True, False, False]]


def test_sequence_log_probs_by_hand():
    # V = 3. Row 0: tokens [2, 0, 2, 1], mask [0, 0, 1, 1]. logits[1] = log [1, 1, 2] -> p(token 2) = 2/4;
    # logits[2] = log [1, 3, 4] -> p(token 1) = 3/8; sum = log(1/2) + log(3/8) = log(3/16) = -1.6739764335716716.
    # Row 1: the same first three tokens, then padding (mask 0) whose logits are -inf: left out, not NaN.
    # Its only answer token is tokens[2] = 2, predicted by logits[1] -> log(1/2) = -0.6931471805599453.
    logits = torch.zeros(2, 4, 3, dtype=D)
    logits[:, 1] = torch.tensor([1.0, 1.0, 2.0], dtype=D).log()
    logits[0, 2] = torch.tensor([1.0, 3.0, 4.0], dtype=D).log()
    logits[1, 2] = -math.inf
    tokens = torch.tensor([[2, 0, 2, 1], [2, 0, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    got = sequence_log_probs(logits, tokens, mask)
    torch.testing.assert_close(got, torch.tensor([math.log(3 / 16), math.log(0.5)]), rtol=1e-6, atol=0)
    assert got.dtype == torch.float32  # gathered in float32 whatever the logits' dtype
    # the first position is never counted: nothing predicts it
    assert torch.equal(sequence_log_probs(logits, tokens, mask.clone().index_fill_(1, torch.tensor([0]), 1)), got)


def test_simpo_by_hand():
    """beta 2, gamma 0.5, mean log-probs -1 and -1.5: -log sigmoid(2 * 0.5 - 0.5) = -log sigmoid(0.5)."""
    from chatrlhf.algorithms.preference import simpo

    got = simpo(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.5], dtype=torch.float64), 2.0, 0.5)
    torch.testing.assert_close(got, torch.tensor([0.47407698418010663], dtype=torch.float64))


def test_orpo_by_hand():
    """beta 0.1, mean probabilities 0.5 and 0.25: odds 1 and 1/3, log odds ratio ln 3;
    NLL ln 2 + 0.1 * -log sigmoid(ln 3) = ln 2 + 0.1 ln(4/3)."""
    from chatrlhf.algorithms.preference import orpo

    got = orpo(torch.tensor([math.log(0.5)], dtype=torch.float64), torch.tensor([math.log(0.25)], dtype=torch.float64),
               0.1)
    torch.testing.assert_close(got, torch.tensor([math.log(2) + 0.1 * math.log(4 / 3)], dtype=torch.float64))
    near_one = orpo(torch.tensor([-1e-12]), torch.tensor([-3.0]), 0.1)  # probability ~1: finite, not log 0
    assert torch.isfinite(near_one).all()


def test_kto_by_hand():
    # beta 0.5, z0 1: desirable r 2 -> 1 - sigmoid(0.5 * (2 - 1)) = 1 - 0.6224593312018546 = 0.3775406687981454;
    # undesirable r 1 -> lambda_U 1.5 * (1 - sigmoid(0.5 * (1 - 1))) = 1.5 * 0.5 = 0.75
    loss = kto(torch.tensor([2.0, 1.0], dtype=D), torch.tensor([True, False]), torch.tensor(1.0, dtype=D), beta=0.5,
               undesirable_weight=1.5)
    torch.testing.assert_close(loss, torch.tensor([0.3775406687981454, 0.75], dtype=D), rtol=1e-12, atol=0)
    # an undesirable answer the policy makes less likely than the reference point lowers its loss: r -3 with z0 1:
    # 1 - sigmoid(0.5 * 4) = 1 - 0.8807970779778823
    low = kto(torch.tensor([-3.0], dtype=D), torch.tensor([False]), torch.tensor(1.0, dtype=D), beta=0.5)
    assert low.item() == pytest.approx(1 - 0.8807970779778823, rel=1e-12)


def test_kto_reference_point_by_hand():
    assert kto_reference_point(torch.tensor(3.0, dtype=D), torch.tensor(2.0, dtype=D)).item() == 1.5
    assert kto_reference_point(torch.tensor(-2.0, dtype=D), torch.tensor(4.0, dtype=D)).item() == 0.0  # clamped
    kl_sum = torch.tensor(3.0, dtype=D, requires_grad=True)
    assert not kto_reference_point(kl_sum, torch.tensor(2.0, dtype=D)).requires_grad  # no gradient through z0


def test_kto_gradient_direction():
    # desirable answers are pushed up, undesirable ones down
    r = torch.zeros(2, dtype=D, requires_grad=True)
    kto(r, torch.tensor([True, False]), torch.tensor(0.0, dtype=D), beta=0.1).sum().backward()
    assert r.grad[0] < 0 < r.grad[1]
