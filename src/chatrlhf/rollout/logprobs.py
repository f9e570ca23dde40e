"""Training-style scoring of rollouts: the logits that predict each answer token, in one forward pass.

Used wherever a rollout's answers are re-scored by a model (PPO's old/reference log-probs and its update,
the evaluation's KL), so every caller sees the same positions, masks and temperature.
"""

from __future__ import annotations

import inspect

import torch

from chatrlhf.algorithms import position_ids_from_mask


def _keeps_logits(model) -> bool:
    forward = getattr(model, "module", model).forward  # a training engine forwards to its module
    return "logits_to_keep" in inspect.signature(forward).parameters


def answer_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, answer_len: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """Logits (B, R, V) predicting the R answer tokens at the end of ``sequences`` (B, P+R), divided by the
    sampling temperature, in float32.

    Position P-1+t predicts answer token t. Position ids come from the mask (left padding does not shift
    them); only the last R+1 positions go through the LM head when the model supports ``logits_to_keep``;
    no KV cache is built.
    """
    keep = {"logits_to_keep": answer_len + 1} if _keeps_logits(model) else {}
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **keep,
    ).logits  # (B, R+1, V) or (B, P+R, V)
    return logits[:, -(answer_len + 1) : -1].float() / temperature
