"""An engine's resumable state, and crash-safe checkpoints of several engines trained together.

One engine (``save_engine_state`` / ``load_engine_state``) writes into an existing dir: model weights
(``model.safetensors``, rank 0), this rank's optimizer state (``optimizer[.rankR-of-W]``), the LR scheduler
(``scheduler.json``) and the step counters (``engine.json``). Several engines (``save_engines`` /
``load_engines``: the actor and the critic) share one step dir of ``chatrlhf.checkpoint`` with the RNG of
every rank and the trainer state, committed together.

The files are written through the modules (``ckpt.<name>``, ``tensor_files.<name>``), so a test can wrap
each phase of a save. Loading checks before it sets anything: ``validate_checkpoint`` reads every state file
of a checkpoint (JSON against ``chatrlhf.checkpoint_schema``, tensor files by their headers) and how they agree.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from chatrlhf import checkpoint as ckpt
from chatrlhf import checkpoint_schema as schema
from chatrlhf import tensor_files
from chatrlhf.checkpoint_schema import check_fields
from chatrlhf.engine.engine import Engine

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")  # DeepSpeed's own
_RNG_FILE = re.compile(r"^rng\.rank(\d+)\.json$")


def _optimizer_file(engine: Engine) -> str:
    # ZeRO >= 1 partitions the optimizer state: one file per rank, world size in the name.
    return "optimizer" if engine.cfg.zero_stage == 0 else f"optimizer.rank{engine.rank}-of-{engine.world_size}"


def engine_state_dict(engine: Engine) -> dict[str, Any]:
    """This rank's optimizer state (a tensor tree), the LR scheduler and the step counters.
    Model weights are written from the module directly (see :func:`save_engine_state`)."""
    ds = engine._ds
    if engine.mid_step:
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


# ---- checking a checkpoint before loading it --------------------------------------------------------------


def _read_counters(directory: Path) -> dict[str, Any]:
    """``engine.json``, checked against ``checkpoint_schema.ENGINE`` (defaults filled in)."""
    if not (directory / "engine.json").is_file():
        raise ckpt.CheckpointError(f"{directory}: no engine.json; not a chatrlhf checkpoint dir")
    return check_fields(directory / "engine.json", ckpt.read_json(directory / "engine.json"), schema.ENGINE)


def _read_scheduler(directory: Path, counters: Mapping[str, Any]) -> dict[str, Any]:
    """``scheduler.json`` as written (for ``load_state_dict``: every key becomes an attribute), once checked
    against ``checkpoint_schema.SCHEDULER`` and the counters: the schedule advances once per applied step."""
    path = directory / "scheduler.json"
    raw = ckpt.read_json(path)
    if check_fields(path, raw, schema.SCHEDULER)["last_epoch"] != counters["optimizer_steps"]:
        raise ckpt.CheckpointError(f"{path}: field 'last_epoch' must equal optimizer_steps of engine.json "
                                   f"({counters['optimizer_steps']}), got {raw['last_epoch']}")
    return raw


def _optimizer_files(counters: Mapping[str, Any]) -> Iterator[str]:
    if counters["zero_stage"] == 0:
        yield "optimizer"
        return
    world = counters["world_size"]
    for rank in range(world):  # lazily: a damaged world_size of 10**12 stops at the first missing file
        yield f"optimizer.rank{rank}-of-{world}"


def validate_engine_dir(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks one engine's files without loading a tensor: ``engine.json``, ``scheduler.json``,
    the header of ``model.safetensors`` and every rank's optimizer files (skeleton and header). Returns the
    counters."""
    directory = Path(directory)
    counters = _read_counters(directory)
    n_lrs = len(_read_scheduler(directory, counters)["base_lrs"])
    tensor_files.weights_header(directory / "model.safetensors")
    for name in _optimizer_files(counters):
        tree = tensor_files.tree_header(directory, name)
        groups = tree.get("param_groups") if isinstance(tree, dict) else None
        if isinstance(groups, list):  # torch's optimizer layout (ZeRO 0): the first step uses these lr/eps/betas
            _check_param_groups(directory / f"{name}.json", groups, n_lrs)
    return counters


def _check_param_groups(path: Path, groups: list, n_lrs: int) -> None:
    if len(groups) != n_lrs:
        raise ckpt.CheckpointError(f"{path.with_name('scheduler.json')}: field 'base_lrs' has {n_lrs} entries but "
                                   f"{path.name} has {len(groups)} parameter groups; they were not saved together")
    try:
        schema.finite_numbers(groups, "param_groups")
    except schema.Invalid as bad:
        raise schema.fail(path, bad) from None


def _check_step(directory: Path, counters: Mapping[str, Any], state: ckpt.TrainerState, exact: bool) -> None:
    """The engine's counters against the trainer state saved with it: same processes, and at least one
    optimizer step per trainer step (exactly one where ``exact``: SFT, RM, DPO)."""
    path = directory / "engine.json"
    if state.world_size and counters["world_size"] != state.world_size:
        raise ckpt.CheckpointError(f"{path}: field 'world_size' must equal world_size of trainer_state.json "
                                   f"({state.world_size}), got {counters['world_size']}")
    if counters["global_steps"] < state.step or (exact and counters["global_steps"] != state.step):
        raise ckpt.CheckpointError(f"{path}: field 'global_steps' must be {'' if exact else 'at least '}the step of "
                                   f"trainer_state.json ({state.step}), got {counters['global_steps']}")


def _rng_ranks(path: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in path.glob("rng.rank*.json") if (m := _RNG_FILE.match(p.name)))


def validate_checkpoint(path: str | os.PathLike, names: Iterable[str] = ("",),
                        one_step_per_step: bool = False) -> ckpt.TrainerState | None:
    """Reads and checks every state file of the checkpoint ``path`` before anything is loaded or written: its
    manifest, the trainer state, the files of each engine in ``names`` (``""``: one at the top level), the
    RNG state of every rank, and how they agree. Returns the trainer state (None if there is none)."""
    path = Path(path)
    ckpt.check_complete(path)
    state = ckpt.load_trainer_state(path) if (path / "trainer_state.json").is_file() else None
    for name in names:
        counters = validate_engine_dir(path / name if name else path)
        if state is not None:
            _check_step(path / name if name else path, counters, state, one_step_per_step)
    for rank in _rng_ranks(path):
        tensor_files.read_rng_state(path, rank)
    return state


def _check_compatible(engine: Engine, directory: Path, counters: Mapping[str, Any], n_lrs: int) -> None:
    """The checkpoint's engine settings against this run's (its files are already checked)."""
    if counters["zero_stage"] != engine.cfg.zero_stage:
        raise ckpt.CheckpointError(
            f"{directory} was saved with ZeRO stage {counters['zero_stage']} but this run uses "
            f"engine.zero_stage={engine.cfg.zero_stage}; resume with the same stage"
        )
    if engine.cfg.zero_stage > 0 and counters["world_size"] != engine.world_size:
        raise ckpt.CheckpointError(
            f"{directory} holds ZeRO-{counters['zero_stage']} optimizer state partitioned over "
            f"{counters['world_size']} processes, but this run has {engine.world_size}; resume with "
            f"{counters['world_size']} processes"
        )
    if n_lrs != len(engine._scheduler.base_lrs):
        raise ckpt.CheckpointError(
            f"{directory / 'scheduler.json'}: field 'base_lrs' has {n_lrs} entries but this run's optimizer has "
            f"{len(engine._scheduler.base_lrs)} parameter groups; resume with the model and settings (LoRA, "
            "engine.weight_decay) the checkpoint was trained with"
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
    try:
        _set_optimizer(engine, optimizer)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:  # torch's / DeepSpeed's checks
        raise ckpt.CheckpointError(
            f"{src / _optimizer_file(engine)}.json does not fit this run's optimizer ({err}); resume with the model "
            "and settings (LoRA, engine.*) the checkpoint was trained with"
        ) from None


def _set_optimizer(engine: Engine, optimizer: Any) -> None:
    current = engine._ds.optimizer
    if engine.cfg.zero_stage == 0:  # torch AdamW, or DeepSpeed's fp16/bf16 wrapper of it
        current.load_state_dict(optimizer)
        return
    from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

    if LOSS_SCALER in optimizer:
        known = vars(current.loss_scaler)  # what engine_state_dict saved; nothing else is set on it
        for key, value in optimizer[LOSS_SCALER].items():
            if key not in known or not isinstance(value, (bool, int, float)) or not math.isfinite(value):
                raise ValueError(f"field '{LOSS_SCALER}.{key}' must be a finite number of the loss scaler, got "
                                 f"{value!r}")
            setattr(current.loss_scaler, key, value)
        optimizer[LOSS_SCALER] = current.loss_scaler
    if hasattr(current, "_param_slice_mappings"):
        optimizer[PARAM_SLICE_MAPPINGS] = current._param_slice_mappings
    # ZeRO loads "the list of every rank's state" but only reads its own entry.
    per_rank: list[Any] = [None] * engine.world_size
    per_rank[engine.rank] = optimizer
    current.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def load_engine_state(engine: Engine, directory: str | os.PathLike) -> None:
    """Restores what :func:`save_engine_state` wrote: weights, optimizer, scheduler, counters. The JSON files
    are checked before anything is set; the tensors as they load (a NaN/inf is a ``CheckpointError``)."""
    src = Path(directory)
    counters = _read_counters(src)
    scheduler = _read_scheduler(src, counters)
    _check_compatible(engine, src, counters, len(scheduler["base_lrs"]))
    _load_weights(engine, src)
    _load_optimizer(engine, src)
    engine._scheduler.load_state_dict(scheduler)
    for key in _COUNTERS:
        setattr(engine._ds, key, counters[key])
    engine.optimizer_steps = counters["optimizer_steps"]
    engine.skipped_steps = counters["nonfinite_skips"]
    engine.consecutive_skips = counters["consecutive_skips"]
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
    at step N-k. A save that raises removes its tmp dir (on rank 0, which made it), so the previous checkpoint
    stays latest and nothing of the failed one is left. All ranks must call it; assumes a filesystem shared by
    all ranks.
    """
    root, engines = Path(root), _named(engines)
    first = next(iter(engines.values()))
    created = None  # the tmp dir, on rank 0: the one process that creates it, and the one that removes it
    try:
        if first.is_rank_0:
            created = ckpt.begin_step(root, step)
            for name in engines:
                if name:
                    (created / name).mkdir()
        tmp = ckpt.tmp_dir_for(root, step, first.broadcast_int(os.getpid()))  # rank 0's pid names the dir
        first.barrier()
        _write_step(tmp, engines, trainer_state, write_extra)
        first.barrier()
        if created is not None:
            ckpt.commit_step(root, tmp, step, keep_last)
    except BaseException:
        # A failed write (a full disk) leaves its half-written step behind until the next run's clean_stale:
        # on a full disk that is the space the next save needs, so it goes now, as in write_step_dir. No
        # collective is added: the other ranks stop as they did before (the launcher ends the group).
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    first.barrier()
    return root / f"step-{step}"


def _write_step(tmp: Path, engines: Mapping[str, Engine], trainer_state: ckpt.TrainerState | None,
                write_extra: Callable[[Path], None] | None) -> None:
    """This rank's share of one step dir: each engine's state and the RNG; the trainer state and the extra
    files on rank 0."""
    first = next(iter(engines.values()))
    for name, engine in engines.items():
        save_engine_state(engine, tmp / name if name else tmp)
    tensor_files.save_rng_state(tmp, first.rank)
    if first.is_rank_0:
        if trainer_state is not None:
            ckpt.save_trainer_state(tmp, trainer_state)
        if write_extra is not None:
            write_extra(tmp)


def load_engines(path: str | os.PathLike, engines: Engine | Mapping[str, Engine],
                 one_step_per_step: bool = False) -> ckpt.TrainerState | None:
    """Restores what :func:`save_engines` wrote into ``engines`` and this rank's RNG, once every file is
    checked (:func:`validate_checkpoint`); returns the trainer state saved with it (None if there was none)."""
    state = validate_checkpoint(path, _named(engines), one_step_per_step)
    restore_engines(path, engines)
    return state


def restore_engines(path: str | os.PathLike, engines: Engine | Mapping[str, Engine]) -> None:
    """The loading half of :func:`load_engines`, for a checkpoint :func:`validate_checkpoint` has checked."""
    path, engines = Path(path), _named(engines)
    for name, engine in engines.items():
        load_engine_state(engine, path / name if name else path)
    tensor_files.load_rng_state(path, next(iter(engines.values())).rank)
