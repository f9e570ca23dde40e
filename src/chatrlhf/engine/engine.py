"""DeepSpeed behind one small object: backward/step with a non-finite guard, collectives, generation mode,
the Hugging Face save.

Gradient semantics (what every stage relies on):
    * ``backward(loss)`` ADDS grad(loss) to the accumulated gradients: DeepSpeed's usual division by
      ``gradient_accumulation_steps`` is switched off (``scale_wrt_gas=False``). Stages normalise their
      losses by the token/sample count of the whole optimizer step, so micro-batch x accumulation gives
      exactly the full-batch gradient.
    * At the accumulation boundary the gradients are AVERAGED over data-parallel processes, so a stage
      that normalises by the global count multiplies its local loss by ``world_size``.
    * ``step()`` clips by the global norm, updates, advances the LR schedule, and returns True only when
      an optimizer step happened.
    * An optimizer step accumulates ``gradient_accumulation_steps`` micro-batches, or the ``n`` that
      ``begin_step(n)`` declared for it (token-budget micro-batches vary per step; the same n on every process).

DeepSpeed is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from chatrlhf import checkpoint as ckpt
from chatrlhf.config import ConfigError, EngineConfig
from chatrlhf.engine.distributed import init_distributed
from chatrlhf.engine.optim import build_optimizer, deepspeed_config, model_dtype
from chatrlhf.precision import Precision, resolve_precision
from chatrlhf.tensor_files import first_nonfinite


@contextlib.contextmanager
def _merged(module: torch.nn.Module, lora: bool):
    if not lora:
        yield
        return
    module.merge_adapter()
    try:
        yield
    finally:
        module.unmerge_adapter()


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient, or the weights to save hold NaN/inf."""


def write_model_dir(model, state: dict[str, torch.Tensor] | None, directory: str | os.PathLike, tokenizer=None) -> None:
    """``model.save_pretrained(directory, state_dict=state)`` (and the tokenizer) made atomic: written under a
    temporary name and renamed in, so a kill never leaves a half-written dir and a model already there stays
    until the new one is complete; a failed write (a full disk) removes its temporary copy."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid
    try:
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        ckpt.publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Engine:
    """DeepSpeed behind one small object (see the module docstring for the gradient semantics).

    ``dtype`` is the dtype DeepSpeed trains the weights in ("float32", "bfloat16" or "float16"); by default
    the dtype of the model's weights (so load the model as ``ModelConfig.dtype`` says). ``precision``
    (``--run.precision``: auto / fp32 / bf16, see ``chatrlhf.precision``) decides whether forwards of fp32
    weights run under bf16 autocast (mixed precision: fp32 master weights and optimizer state).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: EngineConfig,
        total_steps: int,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        precision: str | Precision = "fp32",
        flag: str = "engine",
    ):
        import deepspeed

        cfg.validate(flag)
        dtype = dtype or model_dtype(model)
        self.cfg, self.total_steps, self.dtype = cfg, total_steps, dtype
        self.rank, self.world_size = init_distributed()
        # Plain fp32 data parallel: we clip ourselves, because DeepSpeed's stage-0 clip discards the norm.
        # Everywhere else DeepSpeed owns the (partitioned / master) gradients, so it clips and reports.
        self._own_clip = cfg.zero_stage == 0 and dtype == "float32"
        try:
            optimizer, scheduler = build_optimizer(model, cfg, total_steps)
            self._ds, _, _, self._scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(cfg, dtype, self.world_size, self._own_clip),
            )
        except (ValueError, AssertionError) as err:  # torch's and DeepSpeed's checks of these settings
            raise ConfigError(f"--{flag}.*: the engine settings were refused by {type(err).__module__.split('.')[0]}: "
                              f"{' '.join(str(err).split())[:500]}. Fix: correct the --{flag}.* value it names") from err
        if self.world_size == 1 and cfg.zero_stage == 0:
            # Averaging over one process is the identity, yet DeepSpeed would still flatten every gradient
            # into a bucket, all-reduce it and copy it back each step (~9% of a small model's step time).
            self._ds.enable_backward_allreduce = False
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._micro_done, self._micro_total = 0, cfg.gradient_accumulation_steps  # within the current step
        self.optimizer_steps = 0
        self.skipped_steps = 0
        """Optimizer steps skipped for a NaN/inf loss or gradient (or an fp16 loss-scale overflow)."""
        self.consecutive_skips = 0
        self._nonfinite_loss = False
        self.grad_norm: float | None = None
        self._last_lr = self.current_lr()
        if not isinstance(precision, Precision):
            precision = resolve_precision(precision, self.device)
        if precision.mixed and dtype != "float32":
            precision = Precision("fp32", f"weights are {dtype}: DeepSpeed's {dtype} engine, no autocast",
                                  self.device.type)
        self.precision = precision
        """The resolved precision policy: ``precision.mixed`` -> forwards under bf16 autocast."""

    # ---- basics -------------------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model."""
        return self._ds.module

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(self._ds.device)

    @property
    def lr(self) -> float:
        """The learning rate the last optimizer step used (before any step: the first step's)."""
        return self._last_lr

    def current_lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return float(self._scheduler.get_last_lr()[0])

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    def __call__(self, *args, **kwargs):
        with self.precision.autocast():
            return self._ds(*args, **kwargs)

    # ---- optimisation -------------------------------------------------------------------------------------
    def begin_step(self, micro_batches: int) -> None:
        """The coming optimizer step accumulates ``micro_batches`` micro-batches (each a backward + step), not
        ``gradient_accumulation_steps``; every process declares the same count."""
        if self._micro_done:
            raise RuntimeError(f"begin_step({micro_batches}) after {self._micro_done} micro-batch(es) of a step")
        if micro_batches < 1:
            raise ValueError(f"an optimizer step needs at least one micro-batch, got {micro_batches}")
        self._micro_total = micro_batches

    @property
    def mid_step(self) -> bool:
        """True between a step's first micro-batch and its optimizer step (gradients half accumulated)."""
        return self._micro_done > 0

    def _mark_boundary(self) -> bool:
        # DeepSpeed's own counter assumes a fixed count per step; the boundary is set explicitly instead.
        boundary = self._micro_done + 1 >= self._micro_total
        self._ds.set_gradient_accumulation_boundary(boundary)
        return boundary

    def backward(self, loss: torch.Tensor) -> None:
        """Adds grad(loss) to the accumulated gradients (no division by the accumulation steps).

        A non-finite loss is turned into all-NaN gradients (``loss * nan``), so that the step it belongs
        to is skipped by the same check as a non-finite gradient, on every ZeRO stage alike.
        """
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True
            loss = loss * float("nan")
        self._mark_boundary()
        self._ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> bool:
        """Ends a micro-batch; at the accumulation boundary clips, updates and advances the LR.

        Returns True when an optimizer step happened. A NaN/inf loss or gradient norm skips the update:
        weights, optimizer state and LR schedule stay as they were, ``skipped_steps`` counts it, and after
        ``engine.max_consecutive_nonfinite`` skips in a row :class:`NonFiniteError` stops the run.
        (fp16 loss-scale overflows are skipped the same way but only a non-finite loss counts toward the stop.)
        """
        if not self._mark_boundary():
            self._ds.step()
            self._micro_done += 1
            return False
        self._micro_done, self._micro_total = 0, self.cfg.gradient_accumulation_steps
        self._last_lr = self.current_lr()
        norm = None
        if self._own_clip:
            grads = [p.grad for p in self._params if p.grad is not None]
            total = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            norm = float(total)
            if math.isfinite(norm):
                if self.cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grads_with_norm_(self._params, self.cfg.max_grad_norm, total)
                self._ds.step()
            else:
                self._skip_update()
        else:
            self._ds.step()  # ZeRO and bf16/fp16 optimizers check for inf/NaN themselves and skip
            norm = self._ds.get_global_grad_norm()
        self.grad_norm = None if norm is None else float(norm)
        applied = self._ds.was_step_applied()
        self.optimizer_steps += int(applied)
        self._after_boundary(applied)
        return applied

    def _skip_update(self) -> None:
        # Plain AdamW: drop the gradients (params without one are left untouched, state included) and let
        # DeepSpeed see an overflow, so it books a skipped step and leaves the LR schedule where it was.
        for p in self._params:
            p.grad = None
        optimizer = self._ds.optimizer
        optimizer.overflow = True
        try:
            self._ds.step()
        finally:
            del optimizer.overflow

    def _after_boundary(self, applied: bool) -> None:
        nonfinite_loss = self._nonfinite_loss
        self._nonfinite_loss = False
        if applied:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        if self.dtype == "float16":  # loss-scale overflows are routine; agree on the loss flag across ranks
            flag = self.all_reduce(torch.tensor([int(nonfinite_loss)], dtype=torch.long))
            if not flag.item():
                return
        self.consecutive_skips += 1
        step = self._ds.global_steps
        if self.is_rank_0:
            print(
                f"[chatrlhf] optimizer step {step} skipped: non-finite {'loss' if nonfinite_loss else 'gradient'} "
                f"(grad norm {self.grad_norm}); {self.consecutive_skips} in a row, {self.skipped_steps} in all",
                flush=True,
            )
        limit = self.cfg.max_consecutive_nonfinite
        if limit and self.consecutive_skips >= limit:
            raise NonFiniteError(
                f"stopping at optimizer step {step}: {self.consecutive_skips} steps in a row had a NaN/inf loss "
                "or gradient (each was skipped, the weights are unchanged). Lower engine.learning_rate, check "
                "the data of those steps, or raise engine.max_consecutive_nonfinite; --run.resume true restarts "
                "from the last checkpoint."
            )

    # ---- collectives --------------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: Literal["sum", "mean"] = "sum") -> torch.Tensor:
        """Sum or mean of ``t`` over processes, in place (and returned). A no-op on one process."""
        if op not in ("sum", "mean"):
            raise ValueError(f"all_reduce op must be 'sum' or 'mean', got {op!r}")
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        on_device = t.to(self.device)  # NCCL reduces device tensors only; a no-op for gloo / CPU
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        if op == "mean":
            on_device /= self.world_size
        if on_device is not t:
            t.copy_(on_device)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over processes along dim 0 (every process must pass the same shape)."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        local = t.to(self.device).contiguous()  # NCCL gathers device tensors only
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """``value`` as held by rank ``src``, on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=src)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gathered_parameters(self, params=None, modifier_rank: int | None = None):
        """Context in which ZeRO-3 partitioned parameters are whole (a no-op for stages 0-2). With
        ``modifier_rank`` set, that rank's in-place edits are broadcast on exit."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.module.parameters()) if params is None else list(params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    @contextlib.contextmanager
    def generation_mode(self):
        """The live training module, switched to inference for rollouts and back after (the hybrid engine).

        No copy, no save/reload: generation reads the very weights being trained (LoRA adapters merged
        into them meanwhile). Under ZeRO-3 the
        parameters are gathered once for the whole rollout and ZeRO's per-module fetch/release hooks are
        lifted meanwhile, so decoding runs without a collective per token; they are restored after.
        """
        module = self.module
        was_training = module.training
        module.eval()
        # LoRA (PEFT): fuse the adapters into the (whole) base weights for decoding, unfuse after.
        lora = hasattr(module, "merge_adapter") and hasattr(module, "unmerge_adapter")
        try:
            with torch.no_grad(), self._whole_parameters(), _merged(module, lora):
                yield module
        finally:
            module.train(was_training)

    @contextlib.contextmanager
    def inference_state(self):
        """``(model, state)`` inside the block: the transformers model being trained and its current weights
        as a plain state dict under its own names (LoRA merged, whole under ZeRO-3) -- what an inference copy
        or engine loads. The tensors are live: copy them inside the block."""
        from chatrlhf.models.lora import merged_live_state

        with self.generation_mode() as module:
            yield merged_live_state(module)

    @contextlib.contextmanager
    def _whole_parameters(self):
        if self.cfg.zero_stage != 3:
            yield
            return
        import deepspeed

        offload = self._ds.optimizer.parameter_offload
        offload._remove_module_hooks()
        try:
            # modifier_rank=None: whatever generation does to the gathered copies is discarded on exit.
            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield
        finally:
            offload.setup_zero_stage3_hooks()

    def all_done(self, local_done: bool) -> bool:
        """True once every process is done (lock-step decoding: ranks stop together)."""
        if self.world_size == 1:
            return local_done
        flag = torch.tensor([int(not local_done)], dtype=torch.long, device=self.device)
        return self.all_reduce(flag).item() == 0

    # ---- saving -------------------------------------------------------------------------------------------
    def save_hf(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Consolidated Hugging Face save (safetensors) on rank 0; all ranks must call. Atomic: the dir
        is written under a temporary name and renamed, replacing an old one only once complete.

        LoRA adapters are merged into the saved weights (W + s * B @ A, computed from the state dict, the live
        module untouched), so the dir is a plain model that transformers loads without PEFT."""
        from chatrlhf.models.lora import merged_for_save

        out = Path(directory)
        state = self._ds._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3 else None
        bad = None
        if self.is_rank_0:
            if not hasattr(self.module, "save_pretrained"):
                raise TypeError(f"save_hf needs a Hugging Face model, got {type(self.module).__name__}")
            model, state = merged_for_save(self.module, state)
            bad = first_nonfinite(model.state_dict() if state is None else state)
        # Every rank stops together: a model of NaNs is never saved, nor published over a good one.
        if self.all_reduce(torch.tensor(float(bad is not None))).item():
            raise NonFiniteError(f"the final weights hold NaN or inf (first: {bad or 'on rank 0'}); nothing was "
                                 f"saved to {out}, and a model already there is untouched. Fix: lower the learning "
                                 "rate or clip gradients (engine.max_grad_norm), then train again")
        if self.is_rank_0:
            write_model_dir(model, state, out, tokenizer)
        self.barrier()
