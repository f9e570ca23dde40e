"""Collators: pad encoded items (see encode.py) into batches.

Padding is described by ``attention_mask`` alone. The pad id is often the eos id (SmolLM2, the tiny
test model), so ``input_ids == pad_id`` would also hit every real eos; consumers must never use it.
Labels are not shifted here; causal LMs shift them internally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chatrlhf.data.encode import IGNORE_INDEX
from chatrlhf.data.formats import DataError


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to the longest sequence; returns ``(ids, attention_mask)``, both ``(B, T)`` LongTensors.

    ``side="left"`` puts the padding before the tokens (for generation, so every row ends at T-1).
    ``pad_to_multiple_of`` rounds T up (tensor-core friendly shapes).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass
class SFTCollator:
    """Items ``{"input_ids", "labels"}`` -> right-padded ``input_ids``, ``attention_mask``, ``labels``
    (labels padded with -100 so padding never enters the loss)."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([b["input_ids"] for b in batch], self.pad_id, "right", self.pad_to_multiple_of)
        labels, _ = pad_sequences([b["labels"] for b in batch], IGNORE_INDEX, "right", self.pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PairCollator:
    """Preference items -> one ``(2B, T)`` right-padded batch: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.

    One forward pass scores both answers (as DeepSpeed-Chat's reward model does); ``prompt_lens`` is
    ``(2B,)`` in the same row order, ``num_pairs`` is B.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict]) -> dict:
        seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
        ids, mask = pad_sequences(seqs, self.pad_id, "right", self.pad_to_multiple_of)  # (2B, T)
        prompt_lens = torch.tensor([b["prompt_len"] for b in batch] * 2, dtype=torch.long)  # (2B,)
        return {"input_ids": ids, "attention_mask": mask, "prompt_lens": prompt_lens, "num_pairs": len(batch)}


@dataclass
class PromptCollator:
    """Prompt items -> left-padded ``input_ids``/``attention_mask`` for generation, plus the prompts'
    messages and meta (lists, for reward functions and logging) when the items carry them."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict]) -> dict:
        ids, mask = pad_sequences([b["input_ids"] for b in batch], self.pad_id, "left", self.pad_to_multiple_of)
        out: dict = {"input_ids": ids, "attention_mask": mask}
        for key, name in (("prompt", "prompts"), ("meta", "meta")):
            if all(key in b for b in batch):
                out[name] = [b[key] for b in batch]
        return out


def rating_level(item: dict, num_levels: int) -> int:
    """Class index ``score - 1`` of an integer rating in ``1..num_levels``; raises naming the row otherwise."""
    score = float(item["score"])
    if not score.is_integer() or not 1 <= score <= num_levels:
        raise DataError(f"score {score:g} is not an integer in 1..{num_levels}.",
                        "store integer ratings 1..num_levels, or set num_levels to the scale's top.",
                        source=item.get("_source"), row=item.get("_row"), field="score")
    return int(score) - 1


def check_rating_levels(items: Sequence[dict], num_levels: int) -> None:
    """Checks every rating before training starts (the collator would only fail at that batch)."""
    for item in items:
        rating_level(item, num_levels)


@dataclass
class RatingCollator:
    """Rating items -> right-padded ``input_ids``/``attention_mask``, ``scores`` (B,) float32 and
    ``prompt_lens`` (B,); with ``num_levels`` also ``levels`` (B,) long = score - 1, for a K-way rating
    classifier whose classes are the integer scores 1..num_levels."""

    pad_id: int
    num_levels: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([b["input_ids"] for b in batch], self.pad_id, "right", self.pad_to_multiple_of)
        out = {"input_ids": ids, "attention_mask": mask,
               "scores": torch.tensor([float(b["score"]) for b in batch], dtype=torch.float32),
               "prompt_lens": torch.tensor([b["prompt_len"] for b in batch], dtype=torch.long)}
        if self.num_levels is not None:
            out["levels"] = torch.tensor([rating_level(b, self.num_levels) for b in batch], dtype=torch.long)
        return out
