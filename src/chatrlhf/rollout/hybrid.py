"""How an RL stage's actor generates: the hybrid engine.

The actor trains in one form and generates in another:
    live   exact fp32: the very module being trained, switched to inference (``Engine.generation_mode``);
           rollout log-probs equal the trainer's up to float rounding, and resume is bit-exact
    copy   mixed precision: a bf16 inference copy of the actor's weights (LoRA merged, whole under ZeRO-3),
           refreshed from the training weights before the first rollout after each update
    vllm   a colocated vLLM engine (``rollout/vllm_engine.py``) the same weights are pushed into
In the copy and vllm forms the rollout's log-probs come from another numeric form than the trainer's: the
PPO stage logs the mismatch and corrects it by truncated importance sampling (docs/ppo.md).
"""

from __future__ import annotations

import copy as copy_module

import torch

from chatrlhf.precision import Precision
from chatrlhf.rollout.dispatch import generate
from chatrlhf.rollout.types import Rollout, SamplingConfig


def resolve_backend(choice: str, precision: Precision) -> tuple[str, str]:
    """``--generation.backend`` -> (the backend that runs, why). ``auto`` is the fastest installed one, as
    measured in bench/rollout_throughput.py: vLLM in bf16 when installed, else the native engine; exact fp32
    runs keep the native engine (the exact path, bit-exact resume)."""
    if choice != "auto":
        return choice, f"--generation.backend {choice}"
    if not precision.mixed:
        return "native", "auto: exact fp32 run -> native engine on the live weights"
    from chatrlhf.rollout.vllm_engine import vllm_available

    if vllm_available():
        return "vllm", "auto: vllm is installed and the run is in bf16 (fastest measured)"
    return "native", "auto: bf16 run, vllm not installed (bash scripts/install.sh --vllm) -> native engine"


def _empty_copy(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A fresh instance of ``model``'s transformers class, in ``dtype`` on ``device``, in eval mode. It gets its
    own config: building sets the config's dtype, which must not leak into the trained model's saves."""
    copy = type(model)._from_config(copy_module.deepcopy(model.config), dtype=dtype)
    return copy.to(device).eval().requires_grad_(False)


class ActorRollouts:
    """The actor's rollouts in its generation form (see the module docstring).

    ``form``: live / copy / vllm; ``differs``: the rollout's numeric form differs from the trainer's, so
    its log-probs are not the trainer's (truncated importance sampling applies). Call ``weights_changed()``
    after every optimizer update: the next ``generate`` refreshes the copy / pushes into vLLM first.
    """

    def __init__(self, actor, backend: str, precision: Precision, *, model_dir: str | None = None,
                 max_model_len: int = 0, seed: int = 0, trust_remote_code: bool = False):
        self.actor, self.backend, self.precision = actor, backend, precision
        self.form = "vllm" if backend == "vllm" else ("copy" if precision.mixed else "live")
        self.differs = self.form != "live"
        self._copy: torch.nn.Module | None = None
        self._vllm = None
        self._stale = True
        if self.form == "vllm":
            from chatrlhf.rollout.vllm_engine import VLLMEngine

            self._vllm = VLLMEngine(model_dir, dtype=precision.dtype_name, max_model_len=max_model_len, seed=seed,
                                    trust_remote_code=trust_remote_code)

    def weights_changed(self) -> None:
        self._stale = True

    def _refresh(self) -> None:
        """Copies the actor's current weights into the inference form (all processes call it together)."""
        with self.actor.inference_state() as (model, state):
            if self.form == "copy":
                if self._copy is None:
                    self._copy = _empty_copy(model, self.precision.compute_dtype, self.actor.device)
                self._copy.load_state_dict(state, strict=True)  # casts fp32 -> bf16 while copying
            else:
                self._vllm.push_weights(state.items())
        self._stale = False

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig, *,
                 eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None,
                 sync=None) -> Rollout:
        kwargs = {"eos_token_ids": eos_token_ids, "pad_token_id": pad_token_id, "generator": generator}
        if self.form == "live":
            with self.actor.generation_mode() as model:
                return generate(model, input_ids, attention_mask, sampling, backend=self.backend, sync=sync, **kwargs)
        if self._stale:
            self._refresh()
        if self.form == "copy":  # a whole local model: no collectives in its forwards, so no lock-step
            return generate(self._copy, input_ids, attention_mask, sampling, backend=self.backend, **kwargs)
        return self._vllm.generate(input_ids, attention_mask, sampling, **kwargs)

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.close()
        self._copy = self._vllm = None
