"""DPO-family losses against hand-computed values (expected numbers worked out in each comment)."""

import math

import pytest
import torch

from chatrlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    dpo_sigmoid,
    implicit_rewards,
    ipo,
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
