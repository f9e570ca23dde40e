"""The generation engine: ``generate`` turns left-padded prompts into a ``Rollout`` (see docs/rollout.md).

Backends: "native" (our KV-cache sampler, sampler.py; the default) and "hf" (transformers'
``model.generate``, hf.py; the reference the native one is tested and benchmarked against); "auto" means
native here. An RL actor generates through ``hybrid.ActorRollouts`` (live weights, a bf16 copy, or vLLM).
"""

from __future__ import annotations

from chatrlhf.rollout.dispatch import BACKENDS, generate
from chatrlhf.rollout.hybrid import ActorRollouts, resolve_backend
from chatrlhf.rollout.logprobs import answer_logits
from chatrlhf.rollout.sampler import plan_groups
from chatrlhf.rollout.sampling import choose_tokens, sample_from_weights, top_k_filter, top_p_filter
from chatrlhf.rollout.types import Rollout, SamplingConfig


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts: the tokens inside ``response_mask``, special tokens (the EOS) skipped, stripped."""
    lengths = rollout.response_lengths.tolist()
    ids = [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths)]
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


__all__ = [
    "BACKENDS",
    "ActorRollouts",
    "Rollout",
    "SamplingConfig",
    "answer_logits",
    "choose_tokens",
    "decode_responses",
    "generate",
    "plan_groups",
    "resolve_backend",
    "sample_from_weights",
    "top_k_filter",
    "top_p_filter",
]
