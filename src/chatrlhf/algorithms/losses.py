"""Losses and the small tensor helpers they share.

Conventions: B = batch, T = sequence length, V = vocabulary, K = rating levels. Masks are float or bool
tensors taken from ``attention_mask`` or labels, never from matching pad ids (pad == eos in SmolLM2).
Every loss returns *per-example or per-token values*; callers sum them and divide by the number of
tokens/examples in the whole optimizer step, so that micro-batch x accumulation == full batch exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def gather_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., token] for each position.

    logits (B, T, V) and tokens (B, T) are already aligned (logits[:, t] scores tokens[:, t]).
    Returns (B, T). Uses ``log_softmax`` once, in float32, for numerical stability.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood of the labelled tokens.

    logits (B, T, V) from a causal LM over ``input_ids``; labels (B, T) = input ids with
    ``IGNORE_INDEX`` wherever no loss is taken (prompt, user turns, padding). Position t predicts
    labels[:, t+1]. Returns (nll (B, T-1) with zeros at ignored positions, mask (B, T-1) float).
    The SFT loss of a step is ``nll.sum() / (labelled tokens in the whole step)``.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    return nll, (shift_labels != IGNORE_INDEX).float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise reward-model loss, per pair: -log sigmoid(r_chosen - r_rejected).

    chosen, rejected: (B,) sequence scores read at each answer's last real token (padding never enters).
    Returns (B,). Computed with ``logsigmoid`` so large margins do not underflow to log(0).
    """
    return -F.logsigmoid(chosen.float() - rejected.float())


def rating_loss(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Pointwise ratings classifier loss, per example: cross-entropy of the rating level.

    logits (B, K) read at the last real token; levels (B,) integer classes in [0, K) (rating 1..K minus 1).
    Returns (B,).
    """
    return F.cross_entropy(logits.float(), levels.long(), reduction="none")
