"""Generation for the commands that only run a model (eval, chat, serve): one model, one backend, reused.

``--generation.backend``: ``native`` / ``hf`` generate from the loaded Hugging Face model; ``vllm`` builds one
``VLLMEngine`` from the model's directory at start and reuses it for every call (the Hugging Face weights
are then not needed for generation); ``auto`` is the RL stages' rule (``chatrlhf.rollout.resolve_backend``)
with the model's dtype as the precision: vLLM when it is installed and the model runs in bfloat16, else
native.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatrlhf.precision import Precision
from chatrlhf.rollout.dispatch import generate
from chatrlhf.rollout.hybrid import resolve_backend
from chatrlhf.rollout.types import Rollout, SamplingConfig


def inference_backend(choice: str, dtype: str) -> tuple[str, str]:
    """(backend that runs, why) for ``--generation.backend choice`` and a model loaded in ``dtype``."""
    mode = "bf16" if dtype == "bfloat16" else "fp32"
    return resolve_backend(choice, Precision(mode, f"--model.dtype {dtype}"))


class InferenceEngine:
    """Generates from one model with one backend (see the module docstring); ``close()`` frees a vLLM engine.

    model: the loaded Hugging Face model (needed by native / hf; unused by vllm, may be None there).
    model_dir: its local directory (what vLLM loads). max_model_len: longest prompt + answer vLLM serves.
    """

    def __init__(self, backend: str, *, model=None, model_dir: str | None = None, dtype: str = "float32",
                 max_model_len: int = 2048, seed: int = 0, trust_remote_code: bool = False,
                 kv_cache_gb: float | None = None):
        self.backend, self.reason = inference_backend(backend, dtype)
        self.model, self.vllm = model, None
        if self.backend == "vllm":
            from chatrlhf.rollout.vllm_engine import VLLMEngine

            if model_dir is None:
                raise ValueError("--generation.backend vllm needs the model's directory")
            self.vllm = VLLMEngine(model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                   kv_cache_gb=kv_cache_gb, trust_remote_code=trust_remote_code)
        elif model is None:
            raise ValueError(f"--generation.backend {self.backend} generates from the loaded model; none was given")

    @property
    def device(self) -> torch.device:
        """Where prompts go: the model's device, or the CPU for vLLM (it returns rollouts on the prompts' device)."""
        return torch.device("cpu") if self.model is None else next(self.model.parameters()).device

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig, *,
                 eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None,
                 on_step: Callable[[torch.Tensor], bool] | None = None) -> Rollout:
        """``chatrlhf.rollout.generate``'s contract (``on_step``: streaming and stop), on this engine's backend."""
        if self.vllm is not None:
            return self.vllm.generate(input_ids, attention_mask, sampling, eos_token_ids=eos_token_ids,
                                      pad_token_id=pad_token_id, generator=generator, on_step=on_step)
        return generate(self.model, input_ids, attention_mask, sampling, eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id, backend=self.backend, generator=generator, on_step=on_step)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self.vllm = None

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
