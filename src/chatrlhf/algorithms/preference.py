"""Offline preference losses (DPO family): pure functions of per-sequence log-probabilities.

``PREFERENCE_LOSSES`` (DPO, cDPO, IPO) take the margin h of (B,) summed answer log-probs of the chosen and
rejected answers under the policy and the reference (zeros for the reference in reference-free mode);
``LENGTH_NORMALISED_LOSSES`` (SimPO, ORPO) take the answers' (B,) mean per-token log-probs and no reference.
Each loss returns (B,) per-pair losses; the caller averages. Variants are picked by name, never by
branching here. KTO (unpaired answers, each desirable or undesirable) has its own two functions below.
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


def simpo(avg_chosen: Tensor, avg_rejected: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigmoid(beta (avg_w - avg_l) - gamma), where avg is an
    answer's mean per-token log-prob and gamma a target margin (TRL's CPO ``loss_type="simpo"``).

    Example: beta 2, gamma 0.5, avg_w -1, avg_l -1.5: -log sigmoid(2 * 0.5 - 0.5) = -log sigmoid(0.5)
    = 0.47407698418010663.
    """
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def orpo(avg_chosen: Tensor, avg_rejected: Tensor, beta: float, gamma: float = 0.0) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: the chosen answer's NLL (its mean per-token -log p)
    plus beta (the paper's lambda) times -log sigmoid of the log odds ratio, odds(y) = p / (1 - p) with p the
    answer's mean per-token probability exp(avg):
    log odds_w - log odds_l = (avg_w - avg_l) - (log(1 - e^avg_w) - log(1 - e^avg_l)).

    Example: beta 0.1, avg_w = ln 0.5, avg_l = ln 0.25: odds 1 and 1/3, log ratio ln 3;
    loss = ln 2 + 0.1 * (-log sigmoid(ln 3)) = 0.6931471805599453 + 0.1 * ln(4/3) = 0.7219154527... .
    """
    del gamma  # SimPO's margin; ORPO has none
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    return -avg_chosen - beta * F.logsigmoid(log_odds)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 (log(-expm1 x)) and far below it (log1p(-e^x)) (Maechler 2012)."""
    x = x.clamp(max=-1e-7)  # a mean log-prob of exactly 0 (probability 1) would give log 0
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


LENGTH_NORMALISED_LOSSES: dict[str, Callable[..., Tensor]] = {"simpo": simpo, "orpo": orpo}
"""Reference-free losses of answers' mean per-token log-probs: (avg_w, avg_l, beta, gamma) -> (B,)."""


def kto_reference_point(kl_sum: Tensor, count: Tensor) -> Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 7): the KL of policy to reference, estimated as the
    mean of log pi(y'|x) - log ref(y'|x) over mismatched pairs (a prompt with another example's answer),
    clamped at 0 and detached (no gradient flows through it). Takes the estimate's sum and count, so the caller
    can add them up over micro-batches and processes first.

    Example: sum 3 over 2 answers -> 1.5; sum -2 over 4 -> 0 (clamped).
    """
    return (kl_sum / count.clamp(min=1)).clamp(min=0).detach()


def kto(log_ratios: Tensor, desirable: Tensor, z0: Tensor, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8), per answer (B,): with r = log pi(y|x) - log ref(y|x) (``log_ratios``)
    and the reference point ``z0``, lambda_D (1 - sigmoid(beta (r - z0))) for a desirable answer and
    lambda_U (1 - sigmoid(beta (z0 - r))) for an undesirable one (TRL's ``loss_type="kto"``).

    Example: beta 0.5, z0 1, r = [2, 1], desirable [True, False], lambda_U 1.5:
    1 - sigmoid(0.5) = 0.3775406687981454 and 1.5 * (1 - sigmoid(0)) = 0.75.
    """
    gain = torch.where(desirable, log_ratios - z0, z0 - log_ratios)  # (B,)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratios)  # (B,)
    return weight * (1.0 - torch.sigmoid(beta * gain))


def implicit_rewards(log_probs: Tensor, ref_log_probs: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta (log pi(y) - log ref(y)), (B,), for logging margins and accuracy."""
    return beta * (log_probs - ref_log_probs)
