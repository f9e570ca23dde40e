"""Models that are only evaluated (a reference, a reward model), placed on the device, the CPU or ZeRO-3."""

from __future__ import annotations

import contextlib

import torch

from chatrlhf.engine.distributed import init_distributed
from chatrlhf.engine.optim import model_dtype

PLACEMENTS = ("device", "cpu", "zero3")


class FrozenModel:
    """A model that is only evaluated (PPO's reference, a reward model), placed as asked:

    * ``device``: a full copy on this process's device (colocated with the trained models; fastest).
    * ``cpu``: kept in CPU memory and moved to the device for each forward, or for a whole ``resident()``
      block, then back (DeepSpeed-Chat's reference offload, trading transfer time for device memory).
    * ``zero3``: sharded over the processes by a ZeRO-3 inference engine and gathered layer by layer in
      each forward: every process holds 1/N of it. All processes must call it equally often.

    Tensor arguments are moved to the model's device; the output stays there.
    """

    def __init__(self, model: torch.nn.Module, placement: str, device: torch.device):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement, self.device, self._resident = placement, torch.device(device), False
        model.eval().requires_grad_(False)
        if placement == "zero3":
            import deepspeed

            init_distributed()
            dtype = model_dtype(model)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": dtype == "bfloat16"},
                "fp16": {"enabled": dtype == "float16"},
                "steps_per_print": 2**62,
            }
            self._run, *_ = deepspeed.initialize(model=model, config=config)
            self._run.eval()
            self.module = self._run.module
        else:
            self.module = model.to(self.device if placement == "device" else "cpu")
            self._run = self.module

    @contextlib.contextmanager
    def resident(self):
        """A ``cpu``-placed model stays on the device for the whole block (one round trip for many forwards,
        e.g. every micro-batch of a scoring pass); a no-op for the other placements."""
        if self.placement != "cpu" or self._resident:
            yield
            return
        self.module.to(self.device)
        self._resident = True
        try:
            yield
        finally:
            self.module.to("cpu")
            self._resident = False

    def __call__(self, *args, **kwargs):
        move = lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        args, kwargs = [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}
        with self.resident():
            return self._run(*args, **kwargs)
