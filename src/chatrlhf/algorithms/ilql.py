"""ILQL (Implicit Language Q-Learning, Snell et al. 2022, arXiv 2206.11871): pure functions of tensors.

Offline RL on (prompt, response, score) rows with a causal LM trunk. Conventions (B = batch, T = sequence
length, V = vocabulary): ``input_ids`` (B, T) right-padded; action position t in [0, T-1) is the state after
tokens 0..t and its action is token t+1, so ``actions = input_ids[:, 1:]`` (B, T-1); ``mask`` (B, T-1) is 1
where the action is an answer token. Rewards (B, T-1) sit on action positions (usually the sequence score at
the last answer action). A row is done after its last answer action: V of the next state counts as 0 there.

The objective, per answer action (s, a, r, s'), Q_i the online Q heads, Q^_i their Polyak-averaged targets:
    L_Q   = sum_i (Q_i(s, a) - sg[r + gamma V(s')])^2                     (TD with an implicit max, IQL)
    L_V   = L2_tau(sg[min_i Q^_i(s, a)] - V(s))                           (expectile regression, IQL)
    L_CQL = sum_i (logsumexp_a' Q_i(s, a') - Q_i(s, a))                   (CQL as cross-entropy on Q)
    total = L_Q + L_V + cql_scale * L_CQL
and the policy is pi(a|s) ∝ pi_beta(a|s) exp(beta (Q(s, a) - V(s))) (:func:`ilql_logits`).

Normalisation: every loss is a *sum over answer actions divided by* ``num_tokens``; left ``None`` it is this
batch's answer-action count (a plain masked mean). A caller passes the answer-action count of the whole
optimizer step so that micro-batch x accumulation (and ranks) equals the full batch exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from chatrlhf.algorithms.losses import loss_normalizer
from chatrlhf.algorithms.masking import masked_mean, zero_off_mask

Tensor = torch.Tensor


def _num_tokens(mask: Tensor, num_tokens: float | Tensor | None) -> float | Tensor:
    """The divisor of a summed loss: ``num_tokens`` as given (> 0), else this batch's answer actions (>= 1)."""
    return loss_normalizer(mask, num_tokens, "num_tokens")


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32 (logsumexp and log_softmax over a vocabulary lose digits in half precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expectile_loss(diff: Tensor, tau: float) -> Tensor:
    """IQL's expectile loss L2_tau(u) = |tau - 1(u < 0)| u^2, elementwise; u = diff = Q(s, a) - V(s).

    diff: any shape; returns the same shape. tau in (0, 1): tau > 0.5 weights Q above V more, so V fits an
    upper expectile of Q over the data's actions (an implicit, in-support max); tau 0.5 gives u^2 / 2.

    Example: tau 0.7, diff [2, -2] -> [0.7 * 4, 0.3 * 4] = [2.8, 1.2]; tau 0.5, diff 3 -> 4.5.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    weight = (tau - (diff < 0).to(diff.dtype)).abs()  # tau above, 1 - tau below; in diff's dtype
    return weight * diff.square()


def td_targets(rewards: Tensor, next_values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """One-step TD targets y_t = r_t + gamma V(s_{t+1}), detached; (B, T-1) -> (B, T-1).

    rewards, next_values (V at every action position) and mask are (B, T-1). V(s_{t+1}) is
    ``next_values[:, t+1]`` when ``mask[:, t+1]`` is set, else 0 (terminal: after a row's last answer action,
    at the last column, or wherever the next action is not an answer token). Off the mask the target is 0.
    Values are selected with ``where``, so a NaN at padding never reaches a target.

    Example, gamma 0.5: mask [0, 1, 1, 0], rewards [0, 0, 3, 0], values [9, 1, 2, 7] -> [0, 0 + 0.5 * 2, 3, 0]
    = [0, 1, 3, 0]; mask [1, 1, 1, 1], rewards [0, 0, 0, 2], values [4, 6, 8, 10] -> [3, 4, 5, 2].
    """
    next_values = next_values.detach()
    next_in_answer = torch.zeros_like(mask, dtype=torch.bool)
    next_in_answer[:, :-1] = mask[:, 1:].bool()  # (B, T-1): is s_{t+1} an answer action's state?
    shifted = torch.zeros_like(next_values)
    shifted[:, :-1] = next_values[:, 1:]  # (B, T-1): V(s_{t+1}); the last column has no next state
    bootstrap = zero_off_mask(shifted, next_in_answer)
    return zero_off_mask(rewards.detach() + gamma * bootstrap, mask)


def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """(B, T-1) rewards with each row's score on its last answer action and 0 elsewhere (a sequence-level score,
    as ratings give). scores (B,), mask (B, T-1); a row with no answer action gets no reward.

    Example: scores [2, 5], mask [[0, 1, 1, 0], [1, 1, 1, 1]] -> [[0, 0, 2, 0], [0, 0, 0, 5]].
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * mask.bool()).amax(-1)  # (B,) the last answer action of each row
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores * mask.bool().any(-1).to(scores.dtype)
    return rewards


def q_td_loss(q_taken: Tensor, targets: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Squared TD error sum_t mask_t (Q(s_t, a_t) - y_t)^2 / num_tokens, a scalar.

    q_taken, targets, mask: (B, T-1). ``num_tokens`` None -> this batch's answer actions (a masked mean).

    Example: q [2, 1], y [1, 3], mask [1, 1] -> (1 + 4) / 2 = 2.5; with num_tokens 5 -> 1.0.
    """
    sq = zero_off_mask((q_taken - targets.detach()).square(), mask)
    return sq.sum() / _num_tokens(mask, num_tokens)


def cql_loss(q_all: Tensor, actions: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Conservative term sum_t mask_t (logsumexp_a' Q(s_t, a') - Q(s_t, a_t)) / num_tokens, a scalar: the
    cross-entropy of the taken action with the Q-values as logits, pushing Q down off the data's actions.

    q_all (B, T-1, V), actions (B, T-1) token ids, mask (B, T-1). Computed in at least float32.

    Example, V = 3: Q = ln [1, 2, 3], a = 1 -> ln 6 - ln 2 = ln 3; Q = ln [1, 1, 2], a = 2 -> ln 4 - ln 2 = ln 2;
    both on the mask -> (ln 3 + ln 2) / 2 = ln 6 / 2 = 0.8958797346140275.
    """
    q_all = _at_least_fp32(q_all)
    taken = q_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    ce = zero_off_mask(torch.logsumexp(q_all, dim=-1) - taken, mask)
    return ce.sum() / _num_tokens(mask, num_tokens)


class ILQLLosses(NamedTuple):
    """Loss terms (scalars, normalised by ``num_tokens``) and detached stats (masked means of this batch)."""

    total: Tensor  # q + v + cql_scale * cql
    q: Tensor  # TD loss, summed over the Q heads
    v: Tensor  # expectile loss of the V head
    cql: Tensor  # CQL term, summed over the Q heads
    q_mean: Tensor  # mean online Q(s, a) over heads and answer actions
    v_mean: Tensor  # mean V(s) over answer actions
    target_q_mean: Tensor  # mean min_i Q^_i(s, a) over answer actions


def ilql_losses(
    qs: Sequence[Tensor],
    target_qs: Sequence[Tensor],
    v: Tensor,
    actions: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    tau: float,
    cql_scale: float,
    num_tokens: float | Tensor | None = None,
) -> ILQLLosses:
    """The ILQL objective of one (micro-)batch, see the module docstring for the equations.

    qs, target_qs: one (B, T-1, V) tensor per Q head (online; target, detached here); v (B, T-1) V at every
    action position; actions, rewards, mask (B, T-1). Each term is a sum over answer actions (and over Q heads
    for q and cql) divided by ``num_tokens`` (None -> this batch's answer actions). V reaches the Q loss only
    through detached targets and the Q heads reach the V loss only through detached target heads.

    Example (one row, mask [1, 1], actions [0, 1], rewards [0, 1], v [1, 2], gamma 0.5, tau 0.7, cql_scale 0.1):
    targets [0 + 0.5 * 2, 1] = [1, 1]. Q_1 = [[2, 0], [0, 1]] takes [2, 1]; Q_2 = [[1, 1], [3, 0]] takes [1, 0];
    q = ((2-1)^2 + 0 + 0 + (0-1)^2) / 2 = 1. Targets take [3, 4] and [0.5, 2] -> min [0.5, 2]; diff [-0.5, 0];
    v = (0.3 * 0.25 + 0) / 2 = 0.0375. cql = (ln(1+e^-2) + ln(1+e^-1) + ln 2 + ln(1+e^3)) / 2 = 2.0909621146;
    total = 1 + 0.0375 + 0.1 * 2.0909621146 = 1.2465962115; q_mean 1, v_mean 1.5, target_q_mean 1.25.
    """
    if len(qs) != len(target_qs) or not qs:
        raise ValueError(f"need one target per Q head and at least one head, got {len(qs)} and {len(target_qs)}")
    index = actions.unsqueeze(-1)  # (B, T-1, 1)
    q_taken = [q.gather(-1, index).squeeze(-1) for q in qs]  # each (B, T-1)
    target_taken = torch.stack([q.detach().gather(-1, index).squeeze(-1) for q in target_qs]).amin(0)  # (B, T-1)
    targets = td_targets(rewards, v, mask, gamma)
    n = _num_tokens(mask, num_tokens)
    q_loss = sum(q_td_loss(q, targets, mask, n) for q in q_taken)
    v_loss = zero_off_mask(expectile_loss(target_taken - v, tau), mask).sum() / n
    cql = sum(cql_loss(q, actions, mask, n) for q in qs)
    with torch.no_grad():
        q_mean = torch.stack([masked_mean(zero_off_mask(q, mask), mask) for q in q_taken]).mean()
        v_mean = masked_mean(zero_off_mask(v, mask), mask)
        target_q_mean = masked_mean(zero_off_mask(target_taken, mask), mask)
    return ILQLLosses(q_loss + v_loss + cql_scale * cql, q_loss, v_loss, cql, q_mean, v_mean, target_q_mean)


@torch.no_grad()
def polyak_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], alpha: float) -> None:
    """In place, for each pair: target <- (1 - alpha) target + alpha online; alpha 1 copies, 0 leaves as is.

    Both iterables hold tensors of matching shapes, in the same order (a length mismatch raises ValueError).
    ``lerp_`` is exact at alpha 0 and 1.

    Example: alpha 0.25, target [1, 2], online [5, -2] -> [0.75 + 1.25, 1.5 - 0.5] = [2, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for target, online in zip(target_params, online_params, strict=True):
        target.lerp_(online.to(target.dtype), alpha)


def ilql_logits(logits: Tensor, q_values: Tensor, v_values: Tensor, beta: float) -> Tensor:
    """Decoding scores log pi_beta(a|s) + beta (Q(s, a) - V(s)), the log of the ILQL policy
    pi(a|s) ∝ pi_beta(a|s) exp(beta (Q(s, a) - V(s))) up to a per-state constant (sampling renormalises).

    logits (the behaviour LM's) and q_values: (B, V) or (B, T, V); v_values (B,) or (B, T), broadcast on the
    vocabulary axis. Computed in at least float32. beta 0 returns exactly ``log_softmax(logits)``.

    Example, beta 2: logits [0, ln 3] -> log_softmax [ln 1/4, ln 3/4]; Q [1, 0], V 0.5 -> 2 (Q - V) = [1, -1];
    scores [ln 0.25 + 1, ln 0.75 - 1] = [-0.3862943611198906, -1.2876820724517808].
    """
    log_probs = torch.log_softmax(_at_least_fp32(logits), dim=-1)
    return log_probs + beta * (q_values.to(log_probs.dtype) - v_values.to(log_probs.dtype).unsqueeze(-1))
