"""``generate``: one entry point over the module backends (native, hf), with its input checks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatrlhf.rollout.hf import generate_hf
from chatrlhf.rollout.sampler import generate_native
from chatrlhf.rollout.types import Rollout, SamplingConfig

BACKENDS = ("native", "hf")


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_token_ids, backend: str,
                  sync, max_batch) -> None:
    if backend == "vllm":
        raise ValueError("backend 'vllm' generates from a vLLM engine, not from a module: use "
                         "chatrlhf.rollout.vllm_engine.VLLMEngine (or hybrid.ActorRollouts in RL stages)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, P); got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[0] and not bool((attention_mask[:, -1] != 0).all()):
        bad = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompts must be left-padded with a non-empty prompt in every row (rows {bad[:10]} end "
                         "in padding); pad prompts on the left, as chatrlhf.data.PromptCollator does")
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: pass the end-of-turn token id(s), e.g. [tokenizer.eos_token_id]")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
    if sync is not None and backend != "native":
        raise ValueError("sync (multi-process lock-step) is implemented by the native backend only; "
                         "use backend='native'")


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    backend: str = "native",
    generator: torch.Generator | None = None,
    sync: Callable[[bool], bool] | None = None,
    max_batch: int | None = None,
    on_step: Callable[[torch.Tensor], bool] | None = None,
) -> Rollout:
    """Samples one response per prompt.

    model: a Hugging Face causal LM, normally in eval mode; its mode and weights are never changed.
    input_ids, attention_mask: (B, P) left-padded prompts (pad == eos is fine: masks are never inferred
        from ids). Positions come from the mask, so padding does not shift them.
    sampling: temperature / top-k / top-p / greedy and max_new_tokens.
    eos_token_ids: any of these ends a response (the EOS is part of it); pad_token_id fills the rest.
    backend: "native" (default) or "hf" (``model.generate``, the reference).
    generator: all randomness comes from it (same inputs + same seeded generator -> same rollout);
        it must live on the model's device. None: the global RNG.
    sync: multi-process lock-step (native only). Called once per forward with "this rank has no live
        sequence left" and returns "every rank is done"; until then a done rank keeps running 1-row dummy
        forwards, so collectives inside forward (ZeRO-3 parameter gathers) stay matched across ranks.
    max_batch: at most this many prompts per forward; prompts are grouped by length (less padding), the
        rows of the result are in the original order.
    on_step: streaming (the chat page). Called after every decode step with the (b, t) tokens generated so
        far by the prompts being generated (one sub-batch; all prompts when they fit in one); what follows
        a row's first EOS means nothing. Returning True stops generating at once: rows that have not ended
        are cut there (``finished`` False). None: no calls, the same rollout.
    Runs under ``torch.no_grad()``.
    """
    backend = "native" if backend == "auto" else backend
    _check_inputs(input_ids, attention_mask, eos_token_ids, backend, sync, max_batch)
    eos_token_ids = [int(t) for t in eos_token_ids]
    with torch.no_grad():
        if backend == "hf":
            return generate_hf(model, input_ids, attention_mask, sampling, eos_token_ids=eos_token_ids,
                               pad_token_id=pad_token_id, generator=generator, max_batch=max_batch, on_step=on_step)
        return generate_native(model, input_ids, attention_mask, sampling, eos_token_ids=eos_token_ids,
                               pad_token_id=pad_token_id, generator=generator, sync=sync, max_batch=max_batch,
                               on_step=on_step)
