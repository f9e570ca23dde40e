"""Crash-safe checkpoints: atomic commit, a ``latest`` pointer, rotation, RNG and trainer state, no pickle.

Layout under a checkpoint root::

    root/latest            {"step": 40, "dir": "step-40"}; written last, via tmp file + os.replace
    root/step-40/          one complete checkpoint (renamed into place only once fully written)
        manifest.json      every file of the checkpoint with its size; written just before the rename
        ...                whatever the writer put there (safetensors + JSON only)
    root/tmp-<step>-<pid>/ a checkpoint being written; a crash leaves it behind and the next save removes it

A crash at any moment leaves either the previous checkpoint or the new one as ``latest``, never a
half-written one, and rotation only deletes old checkpoints after the new one is committed.

Nothing here unpickles: tensors are read with safetensors (or ``torch.load(weights_only=True)`` for
foreign ``.pt``/``.bin`` files), everything else is JSON. A tensor tree (an optimizer ``state_dict``,
the RNG states) is stored as ``NAME.safetensors`` (the tensors) plus ``NAME.json`` (the skeleton).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SCRATCH_DIR = re.compile(r"^(tmp|trash)-(\d+)-(\d+)$")
_SCRATCH_DOT = re.compile(r"^\..+\.(tmp|old)-(\d+)$")  # write_json_atomic's and publish_dir's scratch names


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe to load or does not match this run."""


# ---- tensor trees: safetensors for tensors, JSON for the skeleton ------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    # Tags are single-key dicts starting with "__"; plain dicts using such keys go through "__dict__",
    # so decoding is unambiguous. Dict keys may be ints (optimizer state is keyed by param index).
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):  # also IntEnum (e.g. DeepSpeed's ZeroStageEnum): stored as its value
        return int(obj)
    if isinstance(obj, float):
        return {"__float__": repr(obj)} if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(
                    f"{path}: dict key {k!r} of type {type(k).__name__} cannot be stored; use str or int"
                )
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    raise TypeError(
        f"{path}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
        "(only tensors, None, bool, int, float, str, list, tuple and dict are; convert it to those first)"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _dedup_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (views, tied weights, ZeRO's flat buffers): copy
    # every tensor that does not own its whole storage, and the later ones of any that share one.
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for key, t in tensors.items():
        t = t.contiguous()
        storage = t.untyped_storage()
        ptr = (t.device, storage.data_ptr())
        partial = storage.nbytes() != t.numel() * t.element_size()
        out[key] = t.clone() if t.numel() and (ptr in seen or partial) else t
        seen.add(ptr)
    return out


def save_tensor_tree(tree: Any, directory: str | os.PathLike, name: str) -> None:
    """Writes ``tree`` (nested dict/list/tuple of tensors and JSON scalars) as ``name.safetensors`` +
    ``name.json`` in ``directory``. Any other object type raises ``TypeError`` naming where it sits."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, name)
    directory = Path(directory)
    save_file(_dedup_storage(tensors), str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton, allow_nan=False))


def load_tensor_tree(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`save_tensor_tree`."""
    directory = Path(directory)
    skeleton = read_json(directory / f"{name}.json")
    return _decode(skeleton, load_tensors(directory / f"{name}.safetensors", device))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Loads a flat dict of tensors without ever running pickled code.

    ``.safetensors`` files go through safetensors; ``.pt``/``.pth``/``.bin`` through
    ``torch.load(weights_only=True)``, which refuses every object that is not a tensor or a plain
    container. Anything else is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except Exception as err:  # a corrupt or foreign file: say which one
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path}: refused to load; it is not a plain tensor file (torch.load weights_only=True "
                f"said: {err}). Only safetensors or weights-only torch files are loaded."
            ) from err
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        return obj
    raise CheckpointError(f"{path}: unsupported tensor file type {path.suffix!r}; use .safetensors")


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Saves a model ``state_dict`` as safetensors. Tied weights (same memory, e.g. embeddings and LM
    head) are stored once and their other names kept in the file's metadata; tensors that are views
    into a bigger buffer (ZeRO flattens parameters) are copied out first."""
    from safetensors.torch import save_file

    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        t = t.detach()
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
        )
        if key in kept and t.numel():
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t
    save_file(_dedup_storage(tensors), str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights`: every name of the original ``state_dict``, aliases restored."""
    from safetensors import safe_open

    tensors = load_tensors(path, device)
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return path.read_text()


def read_json(path: str | os.PathLike) -> Any:
    """A checkpoint's JSON file; a missing or unparsable one is a :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from err


# ---- atomic commit, pointer, rotation ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to a temporary sibling, fsyncs it, then renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames a fully written ``tmp`` dir to ``final``. An existing ``final`` is moved aside first and
    deleted only after the new one is in place, so ``final`` is never a half-written dir."""
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    old = None
    if final.exists():
        m = _STEP_DIR.match(final.name)
        # a step dir's old copy gets a trash-* name so that clean_stale() finds it after a crash
        old = final.with_name(
            f"trash-{m.group(1)}-{os.getpid()}" if m else f".{final.name}.old-{os.getpid()}"
        )
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Removes scratch left in ``root`` by a crashed writer: ``tmp-*``/``trash-*`` checkpoint dirs and the
    ``.NAME.tmp-PID``/``.NAME.old-PID`` files or dirs of atomic writes and renames. Only entries whose
    writer process is gone (or is this process) are removed; another live process's are left alone."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = _SCRATCH_DIR.match(entry.name)
        pid = int(m.group(3)) if m and entry.is_dir() else None
        if m is None and (m := _SCRATCH_DOT.match(entry.name)):
            pid = int(m.group(2))
        if pid is not None and (pid == os.getpid() or not _pid_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def tmp_dir_for(root: str | os.PathLike, step: int, pid: int | None = None) -> Path:
    """Where step ``step`` is written before its commit (``pid`` defaults to this process)."""
    return Path(root) / f"tmp-{step}-{os.getpid() if pid is None else pid}"


def begin_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """Cleans stale scratch dirs and creates an empty ``root/tmp-<step>-<pid>`` to write into."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = tmp_dir_for(root, step)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | os.PathLike, tmp: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Manifest -> fsync -> rename to ``root/step-<step>`` -> pointer -> rotation, in that order."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (run.keep_last), got {keep_last}")
    root, tmp = Path(root), Path(tmp)
    files = {
        str(p.relative_to(tmp)): p.stat().st_size
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2, sort_keys=True))
    final = root / f"step-{step}"
    publish_dir(tmp, final)
    write_json_atomic(root / POINTER, {"step": step, "dir": final.name})
    rotate(root, keep_last)
    return final


def save_checkpoint(
    root: str | os.PathLike, step: int, write_fn: Callable[[Path], None], keep_last: int = 2
) -> Path:
    """Single-process crash-safe save: ``write_fn(tmp_dir)`` writes the files, then the commit protocol
    runs. If ``write_fn`` raises, the temporary dir is removed and the previous checkpoint stays latest."""
    tmp = begin_checkpoint(root, step)
    try:
        write_fn(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(root, tmp, step, keep_last)


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint dir is complete when its manifest parses and every listed file has its size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete ``step-*`` dir under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if is_complete(p))


def _pointer_target(root: Path) -> Path | None:
    try:
        target = root / json.loads((root / POINTER).read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return target if _STEP_DIR.match(target.name) and target.parent == root else None


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names if it is complete, else the newest complete one, else None."""
    root = Path(root)
    target = _pointer_target(root)
    if target is not None and is_complete(target):
        return target
    found = complete_checkpoints(root)
    if found and (root / POINTER).exists():
        log.warning("%s names no complete checkpoint; using %s", root / POINTER, found[-1][1])
    return found[-1][1] if found else None


def rotate(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Deletes complete checkpoints beyond the newest ``keep_last``, never the one ``latest`` names.
    Each is renamed to a ``trash-*`` dir first so a crash mid-delete leaves no half checkpoint."""
    root = Path(root)
    found = complete_checkpoints(root)
    keep = {p for _, p in found[-keep_last:]}
    target = _pointer_target(root)
    if target is not None:
        keep.add(target)
    removed = []
    for step, path in found:
        if path not in keep:
            trash = root / f"trash-{step}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(path)
    return removed


# ---- RNG and trainer state --------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and (when present) CUDA generator states as a tensor tree."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]},
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(directory: str | os.PathLike, rank: int = 0) -> None:
    save_tensor_tree(capture_rng_state(), directory, f"rng.rank{rank}")


def load_rng_state(directory: str | os.PathLike, rank: int = 0) -> bool:
    """Restores this rank's RNG state; False (with a warning) when the checkpoint has none for it."""
    if not (Path(directory) / f"rng.rank{rank}.json").exists():
        log.warning("%s has no RNG state for rank %d; random streams start fresh", directory, rank)
        return False
    restore_rng_state(load_tensor_tree(directory, f"rng.rank{rank}"))
    return True


@dataclass
class TrainerState:
    """Where a loop stands; saved as ``trainer_state.json`` so a resume continues at the same sample."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps done inside ``epoch``: the data position to continue from."""
    samples_seen: int = 0
    """Training samples consumed so far (all processes)."""
    world_size: int = 0
    """Processes of the run that wrote it (0: not recorded)."""
    global_batch: int = 0
    """Samples per optimizer step over all processes (0: not recorded). A resume with another process count
    continues the same data stream and schedule only if this stays the same."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a stage must restore (KL controller, reward normaliser, best metric): JSON values."""


def save_trainer_state(directory: str | os.PathLike, state: TrainerState) -> None:
    (Path(directory) / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2, sort_keys=True))


def load_trainer_state(directory: str | os.PathLike) -> TrainerState:
    path = Path(directory) / "trainer_state.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {f for f in TrainerState.__dataclass_fields__}
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {sorted(unknown)}")
    return TrainerState(**data)
