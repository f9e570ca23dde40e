"""Choosing the next token from a batch of logits: pure functions of tensors (no model, no state).

N = live sequences, V = vocabulary. The order of operations is the one transformers' ``generate`` uses
(temperature, then top-k, then top-p), so the same settings mean the same distribution in both backends.
"""

from __future__ import annotations

import torch

from chatrlhf.rollout.types import SamplingConfig


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Sets all but the ``k`` largest logits of each row to -inf; ``k`` <= 0 or >= V leaves them unchanged.

    Ties with the k-th largest value are kept (as transformers does), so a row may keep more than k.
    ``top_k_filter([[1, 3, 2, 0]], 2) -> [[-inf, 3, 2, -inf]]``.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (N, 1) the k-th largest per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keeps the smallest set of most likely tokens whose
    probability mass reaches ``p``; the rest become -inf. ``p >= 1`` leaves the logits unchanged.

    A token is kept when the mass of the tokens ranked above it is still below ``p``, so the most likely
    token always survives. Example: probs [0.25, 0.5, 0.125, 0.125] (logits = their logs), p = 0.7:
    ranked 0.5, 0.25, 0.125, 0.125 with mass above 0, 0.5, 0.75, 0.875 -> keep the first two (mass 0.75
    >= 0.7), i.e. ``[log .25, log .5, -inf, -inf]``.
    """
    if p >= 1:
        return logits
    sorted_probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)  # (N, V)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs  # (N, V) mass ranked strictly above each token
    drop_sorted = mass_above >= p  # (N, V) in ranked order; rank 0 is never dropped since p > 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (N, V) back in vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_from_weights(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row drawn with probability proportional to ``weights`` (N, V) >= 0, by inverse CDF:
    the first index whose running sum exceeds u * total, u ~ U[0, 1) -- one random number per row.

    ``torch.multinomial`` draws V exponential variates per row instead (30 ms per step for 32 x 49152 on
    one CPU core, more than the rest of sampling together). A zero weight is never drawn: the running sum
    does not grow there, so it is never the first to exceed u * total.
    Example: weights [[1, 0, 3]] -> cdf [1, 1, 4]; u = 0.2 -> 0.8 -> index 0; u = 0.5 -> 2.0 -> index 2.
    """
    cdf = weights.cumsum(-1)  # (N, V)
    u = torch.rand((weights.shape[0], 1), generator=generator, device=weights.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1)
    return index.clamp_(max=weights.shape[-1] - 1).squeeze(-1)  # clamp: only if rounding made u * total == total


def choose_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs for a batch of next-token logits (N, V).

    Returns ``(tokens (N,) long, log_probs (N,) float32)``. The log-prob is taken under
    ``log_softmax(logits / T)`` of the *unfiltered* logits (T = 1 when greedy): the distribution a
    training-style forward recomputes, so PPO's old/new ratio starts at exactly 1.
    Sampling draws from ``generator`` only (N uniform numbers), so a seeded generator reproduces it.
    Example (greedy): logits [[0, log 3]] -> token 1 with log-prob log(3/4) = -0.2877.
    """
    logits = logits.float()
    if not sampling.do_sample:
        tokens = logits.argmax(-1)  # (N,)
        chosen = logits.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, chosen - torch.logsumexp(logits, dim=-1)
    scaled = logits / sampling.temperature if sampling.temperature != 1.0 else logits  # (N, V)
    top = scaled.amax(-1, keepdim=True)  # (N, 1)
    weights = torch.exp(scaled - top)  # (N, V) unnormalised probabilities, max 1
    log_norm = top.squeeze(-1) + weights.sum(-1).log()  # (N,) logsumexp of the unfiltered logits
    filtered = top_p_filter(top_k_filter(scaled, sampling.top_k), sampling.top_p)
    if filtered is not scaled:  # the most likely token always survives filtering, so ``top`` still fits
        weights = torch.exp(filtered - top)
    tokens = sample_from_weights(weights, generator)  # (N,)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm
