"""Padding-free batches: the real tokens of a padded (B, T) batch packed into K <= B rows, each holding whole
original rows side by side, with position ids restarting per row and attention confined to each row.

    plan = plan_packing(attention_mask)            # which rows share a packed row (best-fit decreasing)
    ids, positions, mask = pack(plan, input_ids)   # (K, L), (K, L), (K, 1, L, L) bool: block-diagonal causal
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits   # (K, L, V)
    per_row = row_sums(plan, token_values)         # (K, L) -> (B,): each original row's sum

A packed row holds at most ``CAPACITY_FACTOR`` x T tokens (T: the padded batch's width), so attention costs no
more per packed row than per padded one, while every linear layer skips the padding. Per-row results equal the padded forward's
up to float rounding (tests/unit/test_packing_plan.py, tests/integration/test_packing.py). Pure tensor functions:
no model here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAPACITY_FACTOR = 1
"""A packed row's width limit, in padded batch widths. Measured on the demo mix (bench/packing.py): at 2 the
packed rows hold less padding (11 % instead of 13-15 %), but the wider attention made PPO's scoring and
update 4-6 % slower than padded, where at 1 they were 7-9 % faster."""


@dataclass(frozen=True)
class PackPlan:
    """Where each real token of the padded batch goes. ``src`` / ``dst``: (N,) flat indices of the N real
    tokens in the padded (B * T) and the packed (K * L) layouts, in the same order."""

    rows: int  # B
    width: int  # T, the padded batch's
    bins: tuple[tuple[int, ...], ...]  # the original rows of each packed row, in order
    packed_width: int  # L
    src: torch.Tensor
    dst: torch.Tensor
    segment: torch.Tensor  # (K, L) long: the original row of each packed position; -1 on packing padding
    position: torch.Tensor  # (K, L) long: the position within its original row (0 on packing padding)

    @property
    def packed_rows(self) -> int:
        return len(self.bins)

    def padding_fraction(self) -> tuple[float, float]:
        """(padded, packed) share of positions that are padding."""
        n = self.src.numel()
        return 1 - n / max(self.rows * self.width, 1), 1 - n / max(self.packed_rows * self.packed_width, 1)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= ``capacity``: longest first, each into the fullest bin it
    fits (a new bin when none). Each bin lists its indices in ascending order; bins are in order of creation.

    Example: lengths [5, 9, 3, 4], capacity 9 -> [[1], [0, 3], [2]] (9 alone; 5 + 4; 3 does not fit with 5 + 4).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in bins]


def plan_packing(attention_mask: torch.Tensor, capacity: int | None = None) -> PackPlan:
    """The packing of a (B, T) batch whose rows' real tokens are contiguous (left or right padding).
    ``capacity``: the most tokens per packed row (default ``CAPACITY_FACTOR`` x T)."""
    b, t = attention_mask.shape
    mask = attention_mask.bool().cpu()
    lengths = mask.sum(-1).tolist()
    starts = mask.int().argmax(-1).tolist()  # first real column of each row
    if any(mask[i, s : s + n].sum() != n for i, (s, n) in enumerate(zip(starts, lengths))):
        raise ValueError("plan_packing needs each row's real tokens in one contiguous run (left or right padding)")
    bins = best_fit_decreasing(lengths, max(capacity or CAPACITY_FACTOR * t, 1))
    width = max(1, max(sum(lengths[i] for i in group) for group in bins))
    segment = torch.full((len(bins), width), -1, dtype=torch.long)
    position = torch.zeros((len(bins), width), dtype=torch.long)
    src, dst = [], []
    for k, group in enumerate(bins):
        offset = 0
        for i in group:
            n = lengths[i]
            segment[k, offset : offset + n] = i
            position[k, offset : offset + n] = torch.arange(n)
            src.append(torch.arange(starts[i], starts[i] + n) + i * t)
            dst.append(torch.arange(offset, offset + n) + k * width)
            offset += n
    cat = (lambda xs: torch.cat(xs)) if src else (lambda xs: torch.zeros(0, dtype=torch.long))
    return PackPlan(b, t, tuple(tuple(g) for g in bins), width, cat(src), cat(dst), segment, position)


def pack(plan: PackPlan, values: torch.Tensor, fill=0) -> torch.Tensor:
    """(B, T, ...) padded layout -> (K, L, ...) packed layout; packing padding holds ``fill``."""
    flat = values.reshape(plan.rows * plan.width, *values.shape[2:])
    out = flat.new_full((plan.packed_rows * plan.packed_width, *values.shape[2:]), fill)
    out[plan.dst.to(values.device)] = flat[plan.src.to(values.device)]
    return out.reshape(plan.packed_rows, plan.packed_width, *values.shape[2:])


def unpack(plan: PackPlan, values: torch.Tensor, fill=0) -> torch.Tensor:
    """(K, L, ...) packed layout -> (B, T, ...) padded layout; padding holds ``fill``."""
    flat = values.reshape(plan.packed_rows * plan.packed_width, *values.shape[2:])
    out = flat.new_full((plan.rows * plan.width, *values.shape[2:]), fill)
    out[plan.src.to(values.device)] = flat[plan.dst.to(values.device)]
    return out.reshape(plan.rows, plan.width, *values.shape[2:])


def block_causal_mask(plan: PackPlan, device: torch.device | None = None) -> torch.Tensor:
    """(K, 1, L, L) bool, True where query i may attend to key j: same original row and j <= i. A position of
    packing padding attends to itself only (a query row with no key would give NaN in SDPA)."""
    seg = plan.segment.to(device)
    same = seg[:, :, None] == seg[:, None, :]  # (K, L, L)
    causal = torch.ones(plan.packed_width, plan.packed_width, dtype=torch.bool, device=device).tril()
    pad_self = torch.eye(plan.packed_width, dtype=torch.bool, device=device) & (seg < 0)[:, :, None]
    return ((same & causal & (seg >= 0)[:, :, None]) | pad_self)[:, None]


def packed_inputs(plan: PackPlan, input_ids: torch.Tensor, pad_id: int, flash: bool = False) -> dict:
    """The forward arguments of the packed batch: ``input_ids``, ``position_ids`` and ``attention_mask`` (the
    block mask; None for flash-attention kernels, which find the rows from the restarting position ids)."""
    device = input_ids.device
    return {"input_ids": pack(plan, input_ids, fill=pad_id), "position_ids": plan.position.to(device),
            "attention_mask": None if flash else block_causal_mask(plan, device)}


def row_sums(plan: PackPlan, values: torch.Tensor) -> torch.Tensor:
    """(K, L) per-token values in the packed layout -> (B,) the sum over each original row (packing padding
    ignored)."""
    seg = plan.segment.to(values.device).reshape(-1)
    keep = seg >= 0
    out = values.new_zeros(plan.rows)
    return out.index_add(0, seg[keep], values.reshape(-1)[keep])


def pack_labels(plan: PackPlan, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B, T) next-token labels -> (K, L): packed, with ``ignore_index`` on packing padding and on each original
    row's first position, which in a packed row would be "predicted" by the previous row's last token (in the
    padded layout nothing predicts a row's first token)."""
    packed = pack(plan, labels, fill=ignore_index)
    return packed.masked_fill(plan.position.to(labels.device) == 0, ignore_index)
