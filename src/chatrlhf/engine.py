"""The one module that touches DeepSpeed: process setup, backward/step, collectives, saving and resuming.

Gradient semantics (what every stage relies on):
    * ``backward(loss)`` ADDS grad(loss) to the accumulated gradients: DeepSpeed's usual division by
      ``gradient_accumulation_steps`` is switched off (``scale_wrt_gas=False``). Stages normalise their
      losses by the token/sample count of the whole optimizer step, so micro-batch x accumulation gives
      exactly the full-batch gradient.
    * At the accumulation boundary the gradients are AVERAGED over data-parallel processes, so a stage
      that normalises by the global count multiplies its local loss by ``world_size``.
    * ``step()`` clips by the global norm, updates, advances the LR schedule, and returns True only when
      an optimizer step happened.

``import chatrlhf.engine`` is cheap: deepspeed is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from chatrlhf import checkpoint as ckpt
from chatrlhf.config import EngineConfig

_LR_KINDS = ("cosine", "linear", "constant")


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based) of ``total``.

    Warm-up is linear and never runs a step at LR 0: factor (step+1)/(warmup+1) for step < warmup.
    Then, with progress p = (step - warmup) / (total - warmup): cosine 0.5 * (1 + cos(pi p)), linear
    1 - p, constant 1. So the factor reaches 0 at step == total, one past the last step.
    Example warmup=1, total=5, cosine: 0.5, 1, 0.8536, 0.5, 0.1464.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    if kind == "constant":
        return 1.0
    raise ValueError(f"engine.lr_scheduler must be one of {_LR_KINDS}, got {kind!r}")


def _skip_shm_comm_build() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op on first init (~80 s with a C++
    # toolchain on 2 cores). gloo is plenty for CPU runs, so skip it unless CHATRLHF_DS_SHM_COMM=1.
    # DeepSpeed caches the probe result in this module-level dict and reads it back, so the edit holds.
    if os.environ.get("CHATRLHF_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n == "lo" or n.startswith("lo")), None)


def init_distributed() -> tuple[int, int]:
    """Joins (or, alone, creates) the process group; returns ``(rank, world_size)``. Idempotent.

    One process (no launcher, or a launcher with one process) gets an in-memory store and its collective
    backend bound to the loopback interface: a single-process run opens no port reachable from the
    network. Under ``deepspeed``/``torchrun`` with several processes it joins their rendezvous. Backend:
    gloo on CPU, DeepSpeed's default (nccl) on GPUs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        _skip_shm_comm_build()
        backend = "gloo"
        # Several processes on one CPU, each with a thread per core, oversubscribe it and every step gets
        # many times slower. torchrun sets OMP_NUM_THREADS=1; the deepspeed launcher does not.
        local_procs = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        if local_procs > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        loopback = _loopback_interface()
        if loopback is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Waits for every process, then tears the process group down. A process that exits with the group
    still alive can abort in its C++ destructors (``terminate called without an active exception``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm gains (every tensor with < 2 dims) get no weight decay (nanoGPT/DSC convention).
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _zero_section(cfg: EngineConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


def _model_dtype(model: torch.nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise ValueError(
            f"cannot infer the training dtype from model weights of dtypes {dtypes}; pass dtype="
        )
    return names[dtypes.pop()]


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
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class Engine:
    """DeepSpeed behind one small object (see the module docstring for the gradient semantics).

    ``dtype`` is the training precision ("float32", "bfloat16" or "float16"); by default the dtype of
    the model's weights (so load the model as ``ModelConfig.dtype`` says).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: EngineConfig,
        total_steps: int,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    ):
        import deepspeed

        cfg.validate()
        dtype = dtype or _model_dtype(model)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if cfg.lr_scheduler not in _LR_KINDS:
            raise ValueError(f"engine.lr_scheduler must be one of {_LR_KINDS}, got {cfg.lr_scheduler!r}")
        self.cfg, self.total_steps, self.dtype = cfg, total_steps, dtype
        self.rank, self.world_size = init_distributed()
        optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            # One fused kernel over all parameters (CPU and GPU): on SmolLM2-135M, one CPU thread, the step
            # takes 0.13 s instead of 1.25 s. ZeRO 1-3 swap in their own flat partitions; keep them plain.
            fused=cfg.zero_stage == 0 or None,
        )
        schedule = functools.partial(
            lr_factor, warmup=cfg.warmup_steps, total=total_steps, kind=cfg.lr_scheduler
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Plain fp32 data parallel: we clip ourselves, because DeepSpeed's stage-0 clip discards the norm.
        # Everywhere else DeepSpeed owns the (partitioned / master) gradients, so it clips and reports.
        self._own_clip = cfg.zero_stage == 0 and dtype == "float32"
        ds_config = {
            "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.world_size,
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "gradient_clipping": 0.0 if self._own_clip else cfg.max_grad_norm,
            "zero_optimization": _zero_section(cfg),
            "zero_allow_untested_optimizer": True,
            # Offload runs our torch AdamW on the CPU copies: DeepSpeedCPUAdam would need a compiled op.
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 2**62,  # we log ourselves; DeepSpeed's progress prints are noise
            "wall_clock_breakdown": False,
            "flops_profiler": {"enabled": False},
        }
        self._ds, _, _, self._scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        if self.world_size == 1 and cfg.zero_stage == 0:
            # Averaging over one process is the identity, yet DeepSpeed would still flatten every gradient
            # into a bucket, all-reduce it and copy it back each step (~9% of a small model's step time).
            self._ds.enable_backward_allreduce = False
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.optimizer_steps = 0
        self.skipped_steps = 0
        """Optimizer steps skipped for a NaN/inf loss or gradient (or an fp16 loss-scale overflow)."""
        self.consecutive_skips = 0
        self._nonfinite_loss = False
        self.grad_norm: float | None = None
        self._last_lr = self.current_lr()

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
        return self._ds(*args, **kwargs)

    # ---- optimisation -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Adds grad(loss) to the accumulated gradients (no division by the accumulation steps).

        A non-finite loss is turned into all-NaN gradients (``loss * nan``), so that the step it belongs
        to is skipped by the same check as a non-finite gradient, on every ZeRO stage alike.
        """
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True
            loss = loss * float("nan")
        self._ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> bool:
        """Ends a micro-batch; at the accumulation boundary clips, updates and advances the LR.

        Returns True when an optimizer step happened. A NaN/inf loss or gradient norm skips the update:
        weights, optimizer state and LR schedule stay as they were, ``skipped_steps`` counts it, and after
        ``engine.max_consecutive_nonfinite`` skips in a row :class:`NonFiniteError` stops the run.
        (fp16 loss-scale overflows are skipped the same way but only a non-finite loss counts toward the stop.)
        """
        if not self._ds.is_gradient_accumulation_boundary():
            self._ds.step()
            return False
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
        if self.is_rank_0:
            if not hasattr(self.module, "save_pretrained"):
                raise TypeError(f"save_hf needs a Hugging Face model, got {type(self.module).__name__}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            model, state = merged_for_save(self.module, state)
            model.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            ckpt.publish_dir(tmp, out)
        self.barrier()

    # ---- resumable state ----------------------------------------------------------------------------------
    def _optimizer_file(self) -> str:
        # ZeRO >= 1 partitions the optimizer state: one file per rank, world size in the name.
        return "optimizer" if self.cfg.zero_stage == 0 else f"optimizer.rank{self.rank}-of-{self.world_size}"

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        """This rank's optimizer state (a tensor tree), the LR scheduler and the step counters.
        Model weights are written from the module directly (see ``write_checkpoint_state``)."""
        ds = self._ds
        if ds.micro_steps % self.cfg.gradient_accumulation_steps:
            raise RuntimeError(
                "checkpoint requested in the middle of gradient accumulation "
                f"(micro-step {ds.micro_steps}); save right after a step() that returned True"
            )
        optimizer = dict(ds.optimizer.state_dict())
        if self.cfg.zero_stage > 0:
            from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

            # Two DeepSpeed objects in ZeRO's state: the loss scaler, kept as its scalar attributes,
            # and the parameter-slice map, which DeepSpeed rebuilds at start-up (dropped).
            if LOSS_SCALER in optimizer:
                scaler = vars(optimizer[LOSS_SCALER])
                optimizer[LOSS_SCALER] = {
                    k: v for k, v in scaler.items() if isinstance(v, (bool, int, float))
                }
            optimizer.pop(PARAM_SLICE_MAPPINGS, None)
        counters = {
            k: int(getattr(ds, k)) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
        }
        engine = {
            **counters,
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_skips": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "zero_stage": self.cfg.zero_stage,
            "world_size": self.world_size,
            "dtype": self.dtype,
        }
        return {"optimizer": optimizer, "scheduler": self._scheduler.state_dict(), "engine": engine}

    def write_checkpoint_state(self, directory: str | os.PathLike) -> None:
        """Writes model weights (rank 0), this rank's optimizer state, scheduler and counters into an
        existing dir. All ranks must call it (ZeRO-3 gathers the weights)."""
        out = Path(directory)
        state = self.state_dict_for_checkpoint()
        with self.gathered_parameters():
            if self.is_rank_0:
                ckpt.save_weights(self.module.state_dict(), out / "model.safetensors")
        if self.cfg.zero_stage > 0 or self.is_rank_0:
            ckpt.save_tensor_tree(state["optimizer"], out, self._optimizer_file())
        if self.is_rank_0:
            (out / "scheduler.json").write_text(json.dumps(state["scheduler"], indent=2))
            (out / "engine.json").write_text(json.dumps(state["engine"], indent=2))

    def _check_compatible(self, directory: Path) -> None:
        saved = ckpt.read_json(directory / "engine.json")
        if saved["zero_stage"] != self.cfg.zero_stage:
            raise ckpt.CheckpointError(
                f"{directory} was saved with ZeRO stage {saved['zero_stage']} but this run uses "
                f"engine.zero_stage={self.cfg.zero_stage}; resume with the same stage"
            )
        if self.cfg.zero_stage > 0 and saved["world_size"] != self.world_size:
            raise ckpt.CheckpointError(
                f"{directory} holds ZeRO-{saved['zero_stage']} optimizer state partitioned over "
                f"{saved['world_size']} processes, but this run has {self.world_size}; resume with "
                f"{saved['world_size']} processes"
            )

    def load_checkpoint_state(self, directory: str | os.PathLike) -> None:
        """Restores what ``write_checkpoint_state`` wrote: weights, optimizer, scheduler, counters."""
        src = Path(directory)
        if not (src / "engine.json").is_file():
            raise ckpt.CheckpointError(f"{src}: no engine.json; not a chatrlhf checkpoint dir")
        self._check_compatible(src)
        with self.gathered_parameters(modifier_rank=0):
            if self.cfg.zero_stage != 3 or self.is_rank_0:
                weights = ckpt.load_weights(src / "model.safetensors", device=self.device)
                try:
                    self.module.load_state_dict(weights, strict=True)
                except RuntimeError as err:  # missing/unexpected keys, size mismatches
                    raise ckpt.CheckpointError(
                        f"{src / 'model.safetensors'} does not fit this model: {err}. Resume with the model "
                        "the checkpoint was trained from (--model.name_or_path of that run)."
                    ) from err
        optimizer = ckpt.load_tensor_tree(src, self._optimizer_file(), device=self.device)
        if self.cfg.zero_stage == 0:  # torch AdamW, or DeepSpeed's fp16/bf16 wrapper of it
            self._ds.optimizer.load_state_dict(optimizer)
        else:
            from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

            current = self._ds.optimizer
            if LOSS_SCALER in optimizer:
                for key, value in optimizer[LOSS_SCALER].items():
                    setattr(current.loss_scaler, key, value)
                optimizer[LOSS_SCALER] = current.loss_scaler
            if hasattr(current, "_param_slice_mappings"):
                optimizer[PARAM_SLICE_MAPPINGS] = current._param_slice_mappings
            # ZeRO loads "the list of every rank's state" but only reads its own entry.
            per_rank: list[Any] = [None] * self.world_size
            per_rank[self.rank] = optimizer
            current.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        self._scheduler.load_state_dict(ckpt.read_json(src / "scheduler.json"))
        engine = ckpt.read_json(src / "engine.json")
        for key in ("global_steps", "global_samples", "micro_steps", "skipped_steps"):
            setattr(self._ds, key, engine[key])
        self.optimizer_steps = engine["optimizer_steps"]
        self.skipped_steps = engine.get("nonfinite_skips", 0)
        self.consecutive_skips = engine.get("consecutive_skips", 0)
        self._last_lr = self.current_lr()

    def save_checkpoint(
        self,
        root: str | os.PathLike,
        step: int,
        trainer_state: ckpt.TrainerState | None = None,
        keep_last: int = 2,
    ) -> Path:
        """Crash-safe checkpoint of this engine alone; see :func:`save_checkpoint`."""
        return save_checkpoint(root, step, {"": self}, trainer_state, keep_last)

    def load_checkpoint(self, path: str | os.PathLike) -> ckpt.TrainerState | None:
        """Inverse of :meth:`save_checkpoint`; see :func:`load_checkpoint`."""
        return load_checkpoint(path, {"": self})


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
            dtype = _model_dtype(model)
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


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    engines: dict[str, Engine],
    trainer_state: ckpt.TrainerState | None = None,
    keep_last: int = 2,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """One crash-safe checkpoint ``root/step-<step>`` of several engines trained together (the actor and
    the critic: each in its own subdir, ``""`` = the top level), the RNG of every rank, the trainer state
    and whatever ``write_extra(dir)`` writes on rank 0 (e.g. EMA weights); then ``root/latest`` and rotation.

    They are committed together by one rename, so a crash can never leave an actor at step N beside a critic
    at step N-k. All ranks must call it; assumes a filesystem shared by all ranks.
    """
    root = Path(root)
    first = next(iter(engines.values()))
    if first.is_rank_0:
        ckpt.begin_checkpoint(root, step)
        for name in engines:
            if name:
                (ckpt.tmp_dir_for(root, step) / name).mkdir()
    tmp = ckpt.tmp_dir_for(root, step, first.broadcast_int(os.getpid()))  # rank 0's pid names the dir
    first.barrier()
    for name, engine in engines.items():
        engine.write_checkpoint_state(tmp / name if name else tmp)
    ckpt.save_rng_state(tmp, first.rank)
    if first.is_rank_0:
        if trainer_state is not None:
            ckpt.save_trainer_state(tmp, trainer_state)
        if write_extra is not None:
            write_extra(tmp)
    first.barrier()
    if first.is_rank_0:
        ckpt.commit_checkpoint(root, tmp, step, keep_last)
    first.barrier()
    return root / f"step-{step}"


def load_checkpoint(path: str | os.PathLike, engines: dict[str, Engine]) -> ckpt.TrainerState | None:
    """Restores what :func:`save_checkpoint` wrote into ``engines`` and this rank's RNG; returns the trainer
    state saved with it (None if there was none)."""
    path = Path(path)
    if not ckpt.is_complete(path):
        raise ckpt.CheckpointError(f"{path} is not a complete checkpoint (manifest missing or files cut short)")
    for name, engine in engines.items():
        engine.load_checkpoint_state(path / name if name else path)
    first = next(iter(engines.values()))
    ckpt.load_rng_state(path, first.rank)
    has_state = (path / "trainer_state.json").is_file()
    return ckpt.load_trainer_state(path) if has_state else None
