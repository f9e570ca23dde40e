"""Masking helpers shared by every loss and model: pure functions of tensors.

Masks always come from ``attention_mask`` (or labels), never from matching pad ids: in SmolLM2 and
many chat models pad == eos, and matching would drop the real end-of-turn token.
"""

from __future__ import annotations

import torch


def zero_off_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every mask == 0 entry replaced by 0 (the values there are never read).

    ``torch.where``, not a multiply: garbage off the mask, even inf or NaN, cannot reach an output or a
    gradient. Example: x [1, nan, 3], mask [1, 0, 1] -> [1, 0, 3].
    """
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set. ``x`` and ``mask`` broadcast to the same shape."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 (not NaN) when the mask is empty."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift them.

    ``[[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]`` (pad positions get 0; they are masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last position with mask == 1, for left or right padding.

    Example: mask [[1, 1, 1, 0], [0, 1, 1, 1]] -> [2, 3]. A row with no real token gives 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).amax(-1)  # (B,)


def gather_last(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, ...): the entry at each row's last real token."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, last_token_index(attention_mask).to(x.device)]
