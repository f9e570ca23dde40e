"""An engine's resumable state, and crash-safe checkpoints of several engines trained together.

One engine (``save_engine_state`` / ``load_engine_state``) writes into an existing dir: model weights
(``model.safetensors``, rank 0), this rank's optimizer state (``optimizer[.rankR-of-W]``), the LR scheduler
(``scheduler.json``) and the step counters (``engine.json``). Several engines (``save_engines`` /
``load_engines``: the actor and the critic) share one step dir of ``chatrlhf.checkpoint`` with the RNG of
every rank and the trainer state, committed together.

The files are written through the modules (``ckpt.<name>``, ``tensor_files.<name>``), so a test can wrap
each phase of a save.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chatrlhf import checkpoint as ckpt
from chatrlhf import tensor_files
from chatrlhf.engine.engine import Engine

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")  # DeepSpeed's own


def _optimizer_file(engine: Engine) -> str:
    # ZeRO >= 1 partitions the optimizer state: one file per rank, world size in the name.
    return "optimizer" if engine.cfg.zero_stage == 0 else f"optimizer.rank{engine.rank}-of-{engine.world_size}"


def engine_state_dict(engine: Engine) -> dict[str, Any]:
    """This rank's optimizer state (a tensor tree), the LR scheduler and the step counters.
    Model weights are written from the module directly (see :func:`save_engine_state`)."""
    ds = engine._ds
    if ds.micro_steps % engine.cfg.gradient_accumulation_steps:
        raise RuntimeError(
            "checkpoint requested in the middle of gradient accumulation "
            f"(micro-step {ds.micro_steps}); save right after a step() that returned True"
        )
    optimizer = dict(ds.optimizer.state_dict())
    if engine.cfg.zero_stage > 0:
        from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

        # Two DeepSpeed objects in ZeRO's state: the loss scaler, kept as its scalar attributes,
        # and the parameter-slice map, which DeepSpeed rebuilds at start-up (dropped).
        if LOSS_SCALER in optimizer:
            scaler = vars(optimizer[LOSS_SCALER])
            optimizer[LOSS_SCALER] = {k: v for k, v in scaler.items() if isinstance(v, (bool, int, float))}
        optimizer.pop(PARAM_SLICE_MAPPINGS, None)
    counters = {
        **{k: int(getattr(ds, k)) for k in _COUNTERS},
        "optimizer_steps": engine.optimizer_steps,
        "nonfinite_skips": engine.skipped_steps,
        "consecutive_skips": engine.consecutive_skips,
        "zero_stage": engine.cfg.zero_stage,
        "world_size": engine.world_size,
        "dtype": engine.dtype,
    }
    return {"optimizer": optimizer, "scheduler": engine._scheduler.state_dict(), "engine": counters}


def save_engine_state(engine: Engine, directory: str | os.PathLike) -> None:
    """Writes model weights (rank 0), this rank's optimizer state, scheduler and counters into an
    existing dir. All ranks must call it (ZeRO-3 gathers the weights)."""
    out = Path(directory)
    state = engine_state_dict(engine)
    with engine.gathered_parameters():
        if engine.is_rank_0:
            tensor_files.save_weights(engine.module.state_dict(), out / "model.safetensors")
    if engine.cfg.zero_stage > 0 or engine.is_rank_0:
        tensor_files.save_tensor_tree(state["optimizer"], out, _optimizer_file(engine))
    if engine.is_rank_0:
        (out / "scheduler.json").write_text(json.dumps(state["scheduler"], indent=2))
        (out / "engine.json").write_text(json.dumps(state["engine"], indent=2))


def _check_compatible(engine: Engine, directory: Path) -> None:
    saved = ckpt.read_json(directory / "engine.json")
    if saved["zero_stage"] != engine.cfg.zero_stage:
        raise ckpt.CheckpointError(
            f"{directory} was saved with ZeRO stage {saved['zero_stage']} but this run uses "
            f"engine.zero_stage={engine.cfg.zero_stage}; resume with the same stage"
        )
    if engine.cfg.zero_stage > 0 and saved["world_size"] != engine.world_size:
        raise ckpt.CheckpointError(
            f"{directory} holds ZeRO-{saved['zero_stage']} optimizer state partitioned over "
            f"{saved['world_size']} processes, but this run has {engine.world_size}; resume with "
            f"{saved['world_size']} processes"
        )


def _load_weights(engine: Engine, src: Path) -> None:
    with engine.gathered_parameters(modifier_rank=0):
        if engine.cfg.zero_stage != 3 or engine.is_rank_0:
            weights = tensor_files.load_weights(src / "model.safetensors", device=engine.device)
            try:
                engine.module.load_state_dict(weights, strict=True)
            except RuntimeError as err:  # missing/unexpected keys, size mismatches
                raise ckpt.CheckpointError(
                    f"{src / 'model.safetensors'} does not fit this model: {err}. Resume with the model "
                    "the checkpoint was trained from (--model.name_or_path of that run)."
                ) from err


def _load_optimizer(engine: Engine, src: Path) -> None:
    optimizer = tensor_files.load_tensor_tree(src, _optimizer_file(engine), device=engine.device)
    current = engine._ds.optimizer
    if engine.cfg.zero_stage == 0:  # torch AdamW, or DeepSpeed's fp16/bf16 wrapper of it
        current.load_state_dict(optimizer)
        return
    from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

    if LOSS_SCALER in optimizer:
        for key, value in optimizer[LOSS_SCALER].items():
            setattr(current.loss_scaler, key, value)
        optimizer[LOSS_SCALER] = current.loss_scaler
    if hasattr(current, "_param_slice_mappings"):
        optimizer[PARAM_SLICE_MAPPINGS] = current._param_slice_mappings
    # ZeRO loads "the list of every rank's state" but only reads its own entry.
    per_rank: list[Any] = [None] * engine.world_size
    per_rank[engine.rank] = optimizer
    current.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def load_engine_state(engine: Engine, directory: str | os.PathLike) -> None:
    """Restores what :func:`save_engine_state` wrote: weights, optimizer, scheduler, counters."""
    src = Path(directory)
    if not (src / "engine.json").is_file():
        raise ckpt.CheckpointError(f"{src}: no engine.json; not a chatrlhf checkpoint dir")
    _check_compatible(engine, src)
    _load_weights(engine, src)
    _load_optimizer(engine, src)
    engine._scheduler.load_state_dict(ckpt.read_json(src / "scheduler.json"))
    counters = ckpt.read_json(src / "engine.json")
    for key in _COUNTERS:
        setattr(engine._ds, key, counters[key])
    engine.optimizer_steps = counters["optimizer_steps"]
    engine.skipped_steps = counters.get("nonfinite_skips", 0)
    engine.consecutive_skips = counters.get("consecutive_skips", 0)
    engine._last_lr = engine.current_lr()


def _named(engines: Engine | Mapping[str, Engine]) -> Mapping[str, Engine]:
    # One engine is written at the top level of the step dir (name "").
    return {"": engines} if isinstance(engines, Engine) else engines


def save_engines(
    root: str | os.PathLike,
    step: int,
    engines: Engine | Mapping[str, Engine],
    trainer_state: ckpt.TrainerState | None = None,
    keep_last: int = 2,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """One crash-safe checkpoint ``root/step-<step>`` of one engine or of several trained together (the actor
    and the critic: each in its own subdir, ``""`` = the top level), the RNG of every rank, the trainer state
    and whatever ``write_extra(dir)`` writes on rank 0 (e.g. EMA weights); then ``root/latest`` and rotation.

    They are committed together by one rename, so a crash can never leave an actor at step N beside a critic
    at step N-k. All ranks must call it; assumes a filesystem shared by all ranks.
    """
    root, engines = Path(root), _named(engines)
    first = next(iter(engines.values()))
    if first.is_rank_0:
        ckpt.begin_step(root, step)
        for name in engines:
            if name:
                (ckpt.tmp_dir_for(root, step) / name).mkdir()
    tmp = ckpt.tmp_dir_for(root, step, first.broadcast_int(os.getpid()))  # rank 0's pid names the dir
    first.barrier()
    for name, engine in engines.items():
        save_engine_state(engine, tmp / name if name else tmp)
    tensor_files.save_rng_state(tmp, first.rank)
    if first.is_rank_0:
        if trainer_state is not None:
            ckpt.save_trainer_state(tmp, trainer_state)
        if write_extra is not None:
            write_extra(tmp)
    first.barrier()
    if first.is_rank_0:
        ckpt.commit_step(root, tmp, step, keep_last)
    first.barrier()
    return root / f"step-{step}"


def load_engines(path: str | os.PathLike, engines: Engine | Mapping[str, Engine]) -> ckpt.TrainerState | None:
    """Restores what :func:`save_engines` wrote into ``engines`` and this rank's RNG; returns the trainer
    state saved with it (None if there was none)."""
    path, engines = Path(path), _named(engines)
    if not ckpt.is_complete(path):
        raise ckpt.CheckpointError(f"{path} is not a complete checkpoint (manifest missing or files cut short)")
    for name, engine in engines.items():
        load_engine_state(engine, path / name if name else path)
    first = next(iter(engines.values()))
    tensor_files.load_rng_state(path, first.rank)
    has_state = (path / "trainer_state.json").is_file()
    return ckpt.load_trainer_state(path) if has_state else None
