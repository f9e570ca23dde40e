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


def answer_mask(attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool mask of the answer tokens of right-padded ``prompt + answer`` rows: positions at or after
    the row's prompt length that hold a real token (``attention_mask`` 1), so the answer's EOS is in it and
    padding is not, even where the pad id equals the EOS id.

    Example: attention_mask [[1, 1, 1, 1, 0]], prompt_lens [2] -> [[False, False, True, True, False]].
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions >= prompt_lens.to(attention_mask.device)[:, None]) & (attention_mask != 0)  # (B, T)


def sequence_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each row: sum_t mask[t] log p(tokens[t] | tokens[<t]).

    logits (B, T, V) from a causal LM over tokens (B, T), so logits[:, t] predicts tokens[:, t+1]; mask (B, T)
    marks the tokens that count (e.g. :func:`answer_mask`). ``mask[:, 0]`` is ignored: nothing predicts the
    first token. Returns (B,) in float32. Masked-out positions are dropped with ``where``, not multiplied by
    0, so a -inf log-prob at a padded position cannot turn the sum into NaN.

    Example (V = 3): tokens [2, 0, 2, 1], mask [0, 0, 1, 1]; logits[1] = log [1, 1, 2] gives p(2) = 2/4 and
    logits[2] = log [1, 3, 4] gives p(1) = 3/8, so the sum is log(1/2) + log(3/8) = log(3/16) = -1.6739764.
    """
    logp = gather_log_probs(logits[:, :-1], tokens[:, 1:])  # (B, T-1): log p of tokens 1..T-1
    return torch.where(mask[:, 1:].bool(), logp, 0.0).sum(-1)  # (B,)


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
