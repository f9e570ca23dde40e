"""Training-style scoring of rollouts: the logits that predict each answer token, in one forward pass.

Used wherever a rollout's answers are re-scored by a model (PPO's old/reference log-probs and its update,
the evaluation's KL), so every caller sees the same positions, masks and temperature.
"""

from __future__ import annotations

import inspect

import torch

from chatrlhf.algorithms import position_ids_from_mask
from chatrlhf.data.packing import packed_inputs, plan_packing
from chatrlhf.models.lm_head import logits_at
from chatrlhf.models.loading import uses_flash_attention


def _keeps_logits(model) -> bool:
    forward = getattr(model, "module", model).forward  # a training engine forwards to its module
    return "logits_to_keep" in inspect.signature(forward).parameters


def answer_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, answer_len: int,
                  temperature: float = 1.0, packing: bool = False) -> torch.Tensor:
    """Logits (B, R, V) predicting the R answer tokens at the end of ``sequences`` (B, P+R), divided by the
    sampling temperature, in float32.

    Position P-1+t predicts answer token t. Position ids come from the mask (left padding does not shift
    them); only the last R+1 positions go through the LM head when the model supports ``logits_to_keep``;
    no KV cache is built. With ``packing`` the rows run packed without padding (``chatrlhf.data.packing``)
    and the logits at padding positions are 0 (masked by every caller); the rest equal the padded forward's
    up to float rounding.
    """
    if packing:
        return _packed_answer_logits(model, sequences, attention_mask, answer_len) / temperature
    keep = {"logits_to_keep": answer_len + 1} if _keeps_logits(model) else {}
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **keep,
    ).logits  # (B, R+1, V) or (B, P+R, V)
    return logits[:, -(answer_len + 1) : -1].float() / temperature


def _packed_answer_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, answer_len: int):
    b, t = sequences.shape
    plan = plan_packing(attention_mask)
    where = torch.full((b * t,), -1, dtype=torch.long)  # padded flat position -> packed flat position
    where[plan.src] = plan.dst
    cols = torch.arange(t - answer_len - 1, t - 1)  # the positions that predict the answer tokens
    index = where.view(b, t)[:, cols]  # (B, R); -1 at padding
    scored = torch.zeros(plan.packed_rows * plan.packed_width, dtype=torch.bool)
    scored[index[index >= 0]] = True
    inputs = packed_inputs(plan, sequences, pad_id=0, flash=uses_flash_attention(model))
    logits = logits_at(model, inputs, scored.view(plan.packed_rows, -1)).float()  # (N, V), packed position order
    rank = scored.cumsum(0) - 1  # packed flat position -> its row of ``logits``
    picked = logits[rank[index.clamp(min=0)].to(logits.device)]  # (B, R, V)
    return picked.masked_fill((index < 0).to(logits.device)[..., None], 0.0)
