"""Hand-computed checks of the loss and masking math in chatrlhf.algorithms."""

import math

import torch

from chatrlhf.algorithms import (
    gather_log_probs,
    masked_mean,
    pairwise_loss,
    position_ids_from_mask,
    rating_loss,
    token_nll,
)


def test_pairwise_loss_by_hand():
    """-log sigmoid(c - r) = log(1 + exp(-(c - r))).

    (c, r) = (1, 0): log(1 + e^-1) = 0.313261687518...
    (c, r) = (0, 2): log(1 + e^2)  = 2.126928011042...
    (c, r) = (3, 3): log 2         = 0.693147180559...
    (c, r) = (-100, 0): log(1 + e^100) = 100 + log(1 + e^-100) = 100.0 (no overflow, no inf)
    """
    c = torch.tensor([1.0, 0.0, 3.0, -100.0], dtype=torch.float64)
    r = torch.tensor([0.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([0.31326168751822286, 2.1269280110429727, math.log(2.0), 100.0], dtype=torch.float32)
    torch.testing.assert_close(pairwise_loss(c, r), expected, rtol=1e-6, atol=0)


def test_pairwise_loss_gradient_pushes_chosen_up():
    """d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(c - r)); at c = r that is -1/2."""
    c = torch.zeros(1, requires_grad=True)
    r = torch.zeros(1, requires_grad=True)
    pairwise_loss(c, r).sum().backward()
    assert c.grad.item() == -0.5 and r.grad.item() == 0.5


def test_rating_loss_by_hand():
    """logits = log([1, 2, 3, 4]) -> p = [.1, .2, .3, .4]; level 3 (rating 4): -log .4 = 0.916290731874155.
    Uniform logits over 3 levels: -log(1/3) = 1.0986122886681098."""
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(rating_loss(logits, torch.tensor([3])), torch.tensor([0.916290731874155]), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        rating_loss(torch.zeros(1, 3), torch.tensor([1])), torch.tensor([1.0986122886681098]), rtol=1e-6, atol=0
    )


def test_token_nll_shift_and_mask_by_hand():
    """T = 3, V = 2. logits[0] = [0, 0] predicts labels[1] = 1: -log(1/2) = 0.693147.
    logits[1] = [log 3, 0] -> p = [3/4, 1/4] predicts labels[2] = 0: -log(3/4) = 0.287682.
    labels[0] is never predicted; an ignored label gives nll 0 and mask 0."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    nll, mask = token_nll(logits, torch.tensor([[-100, 1, 0]]))
    torch.testing.assert_close(nll, torch.tensor([[math.log(2.0), -math.log(0.75)]]), rtol=1e-6, atol=0)
    assert mask.tolist() == [[1.0, 1.0]]
    nll, mask = token_nll(logits, torch.tensor([[7, -100, 0]]))
    assert nll[0, 0].item() == 0.0 and mask.tolist() == [[0.0, 1.0]]


def test_gather_log_probs_matches_hand_value():
    """logits [0, log 3] -> p(token 1) = 3/4."""
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(gather_log_probs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))


def test_masked_mean_ignores_masked_and_empty_is_zero():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, m).item() == 1.5  # (1 + 2) / 2
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 0.0]))


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]
