"""The LM head on the positions a loss reads, not on every position of the forward.

On a small model with a large vocabulary the head (hidden x vocabulary) is a fifth or more of a forward's
multiply-adds, and its (positions x vocabulary) logits the largest activation. A packed training or scoring
forward needs logits only where the next token is scored (answer tokens, labelled tokens), so the hidden
states of the other positions are dropped just before the head: a forward pre-hook on the model's output
embeddings, which also works through DeepSpeed, ZeRO-3 and PEFT wrappers. The head is applied per position, so
the logits kept are the full forward's up to float rounding.
"""

from __future__ import annotations

import torch


def logits_at(model, inputs: dict, where: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) at the N positions where ``where`` (K, L) is True, in row-major order, from one forward of
    ``model`` (an Engine, a frozen model or a plain causal LM) on ``inputs`` (K, L) without a KV cache."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    flat = where.reshape(-1).nonzero().squeeze(-1)  # (N,)
    if head is None:  # no separate head to cut: every position's logits, then those asked for
        logits = model(**inputs, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])[flat.to(logits.device)]

    def keep_positions(_module, args):
        hidden = args[0]  # (K, L, H)
        return (hidden.reshape(-1, hidden.shape[-1])[flat.to(hidden.device)][None], *args[1:])

    handle = head.register_forward_pre_hook(keep_positions)
    try:
        logits = model(**inputs, use_cache=False).logits  # (1, N, V)
    finally:
        handle.remove()
    return logits[0]
