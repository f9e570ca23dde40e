"""A frozen reference model's answer log-probs for the offline stages (DPO, KTO): scored once before training,
stored in each item, and the reference freed.

Batches are any collator's ``input_ids`` / ``attention_mask`` / ``prompt_lens`` over 2P rows in two blocks of
P (DPO: chosen then rejected answers; KTO: each answer then its mismatched KL row); an item's stored value is
``[first block's log-prob, second block's log-prob]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chatrlhf.algorithms import (
    answer_mask,
    gather_log_probs,
    position_ids_from_mask,
    sequence_log_probs,
)
from chatrlhf.data.packing import pack, packed_inputs, plan_packing, row_sums
from chatrlhf.models import disable_dropout, load_causal_lm, uses_flash_attention
from chatrlhf.models.lm_head import logits_at
from chatrlhf.training import rank_batches

REF_KEY = "ref_logps"  # an item's precomputed reference log-probs: [first block, second block]


def answer_log_probs(model, batch: dict, device: torch.device, packing: bool = False) -> torch.Tensor:
    """Summed answer log-probs (N,) of a batch's N right-padded rows, EOS included, from one forward of
    ``model`` (an Engine or a plain causal LM); with ``packing``, over the rows packed without padding
    (``chatrlhf.data.packing``): the same sums up to float rounding."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (N, T) each
    answers = answer_mask(mask, batch["prompt_lens"].to(device))  # (N, T)
    if not packing:
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits  # (N, T, V)
        return sequence_log_probs(logits, ids, answers)  # (N,)
    plan = plan_packing(mask)
    inputs = packed_inputs(plan, ids, pad_id=0, flash=uses_flash_attention(model))
    targets = pack(plan, answers, fill=False) & (plan.position.to(device) > 0)  # a row's first token: no target
    scored = targets[:, 1:]  # (K, L-1): position t predicts answer token t + 1
    logits = logits_at(model, inputs, F.pad(scored, (0, 1)))  # (M, V): the LM head on those positions only
    logps = gather_log_probs(logits, inputs["input_ids"][:, 1:][scored])  # (M,)
    per_token = torch.zeros(scored.shape, device=logps.device).masked_scatter(scored, logps)  # (K, L-1)
    return row_sums(plan, F.pad(per_token, (1, 0)))  # (N,): token j's log-prob sits at packed position j


@torch.no_grad()
def precompute_reference(reference, items: list[dict], collate, batch_size: int, engine,
                         progress: bool = False, desc: str = "reference", packing: bool = False) -> None:
    """Stores each item's reference log-probs ``[first, second]`` under ``REF_KEY``.

    Each rank scores every ``world_size``-th item and the results are gathered, so every rank ends with
    all of them (any rank may draw any item in a later epoch). ``reference`` must be in eval mode.
    """
    rank, world = engine.rank, engine.world_size
    per_rank = -(-len(items) // world)
    out = torch.zeros(per_rank, 2, dtype=torch.float32, device=engine.device)  # equal shapes on every rank
    batches = rank_batches(len(items), rank, world, batch_size)
    for b, (idx, _) in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        logps = answer_log_probs(reference, collate([items[j] for j in idx]), engine.device, packing)  # (2P,)
        out[b * batch_size : b * batch_size + len(idx)] = torch.stack(logps.split(len(idx)), dim=-1)  # (P, 2)
    gathered = engine.all_gather(out).cpu()  # (world * per_rank, 2): rank r's k-th row is item r + k * world
    for r in range(world):
        for k, j in enumerate(range(r, len(items), world)):
            items[j][REF_KEY] = gathered[r * per_rank + k].tolist()


def load_reference(name_or_path: str, model_cfg, dropout_off: bool, device: torch.device):
    """The frozen reference (``model_cfg``: the stage's ModelConfig, for dtype and trust_remote_code)."""
    reference = load_causal_lm(name_or_path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code)
    if dropout_off:
        disable_dropout(reference)
    return reference.eval().requires_grad_(False).to(device)
