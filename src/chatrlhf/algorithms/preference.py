"""Offline preference losses (DPO family): pure functions of per-sequence log-probabilities.

Inputs are (B,) summed answer log-probs of the chosen and rejected answers under the policy and the
reference (pass zeros for the reference in reference-free mode). Each loss returns (B,) per-pair losses;
the caller averages. Variants are picked from ``PREFERENCE_LOSSES`` by name, never by branching here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def preference_logits(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), (B,): the implicit reward margin / beta.

    Example: chosen -1, rejected -3, ref_chosen -2, ref_rejected -2 -> (1) - (-1) = 2.
    """
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h); with label smoothing eps, the conservative
    cDPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    Example: beta 0.5, h = [2, 0]: -log sigmoid(1) = 0.31326168751822286, -log sigmoid(0) = ln 2;
    eps 0.1 on h = 2: 0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228 = 0.41326168751822284.
    """
    z = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, regressing the margin to a fixed target.

    Example: beta 0.5 -> target 1; h = [2, 0] -> [1, 1]; h = 1 -> 0.
    """
    del label_smoothing  # not defined for IPO; accepted so every variant has one signature
    return (h - 1.0 / (2.0 * beta)) ** 2


PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {"sigmoid": dpo_sigmoid, "ipo": ipo}


def implicit_rewards(log_probs: Tensor, ref_log_probs: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta (log pi(y) - log ref(y)), (B,), for logging margins and accuracy."""
    return beta * (log_probs - ref_log_probs)
