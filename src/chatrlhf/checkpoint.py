"""Crash-safe checkpoint dirs: atomic commit, a ``latest`` pointer, rotation, stale-scratch cleanup, and the
trainer state. Torch-free (the tensor files themselves are ``chatrlhf.tensor_files``), so ``CheckpointError``
imports cheaply. The schemas of the state files are in ``chatrlhf.checkpoint_schema``.

Layout under a checkpoint root::

    root/latest            {"step": 40, "dir": "step-40"}; written last, via tmp file + os.replace
    root/step-40/          one complete checkpoint (renamed into place only once fully written)
        manifest.json      every file of the checkpoint with its size; written just before the rename
        ...                whatever the writer put there (safetensors + JSON only)
    root/tmp-<step>-<pid>/ a checkpoint being written; a crash leaves it behind and the next save removes it

A crash at any moment leaves either the previous checkpoint or the new one as ``latest``, never a
half-written one, and rotation only deletes old checkpoints after the new one is committed. A step dir is
written by ``begin_step`` -> (the writer's files) -> ``commit_step``, or by ``write_step_dir`` in one call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatrlhf.checkpoint_schema import MANIFEST as MANIFEST_SCHEMA
from chatrlhf.checkpoint_schema import POINTER as POINTER_SCHEMA
from chatrlhf.checkpoint_schema import TRAINER_STATE, CheckpointError, check_fields
from chatrlhf.limits import InputError, parse_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SCRATCH_DIR = re.compile(r"^(tmp|trash)-(\d+)-(\d+)$")
_SCRATCH_DOT = re.compile(r"^\..+\.(tmp|old)-(\d+)$")  # write_json_atomic's and publish_dir's scratch names


# ---- JSON files and atomic publishing ---------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """A checkpoint's JSON file, read with the limits of ``chatrlhf.limits`` (no duplicate keys, NaN, depth
    over 100 or integers beyond 64 bits); a missing or unparsable one is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        return parse_json(path.read_bytes(), str(path))
    except InputError as err:  # its message starts with the path and names the field
        raise CheckpointError(str(err)) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None


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


# ---- step dirs, pointer, rotation, stale scratch ---------------------------------------------------------


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


def begin_step(root: str | os.PathLike, step: int) -> Path:
    """Cleans stale scratch dirs and creates an empty ``root/tmp-<step>-<pid>`` to write into."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = tmp_dir_for(root, step)
    tmp.mkdir()
    return tmp


def commit_step(root: str | os.PathLike, tmp: str | os.PathLike, step: int, keep_last: int) -> Path:
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


def write_step_dir(
    root: str | os.PathLike, step: int, write_fn: Callable[[Path], None], keep_last: int = 2
) -> Path:
    """Single-process crash-safe save: ``write_fn(tmp_dir)`` writes the files, then the commit protocol
    runs. If ``write_fn`` raises, the temporary dir is removed and the previous checkpoint stays latest."""
    tmp = begin_step(root, step)
    try:
        write_fn(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_step(root, tmp, step, keep_last)


def check_complete(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint dir ``path``; a :class:`CheckpointError` says what makes it incomplete:
    the manifest missing or malformed, or of another step, or a file it lists missing or of another size."""
    path = Path(path)
    manifest = check_fields(path / MANIFEST, read_json(path / MANIFEST), MANIFEST_SCHEMA)
    if (m := _STEP_DIR.match(path.name)) and int(m.group(1)) != manifest["step"]:
        raise CheckpointError(f"{path / MANIFEST}: field 'step' must be {m.group(1)} (the step of its dir), got "
                              f"{manifest['step']}")
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing; the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, but {MANIFEST} lists {size}; it was cut "
                                  "short or changed after the save")
    return manifest


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint dir is complete when its manifest is valid and every listed file has its size."""
    try:
        check_complete(path)
    except (CheckpointError, OSError):
        return False
    return True


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
    """The checkpoint ``root/latest`` names if it is complete, else the newest complete one, else None.
    Lenient, for looking at what a run left; a resume uses the strict :func:`resume_checkpoint`."""
    root = Path(root)
    target = _pointer_target(root)
    if target is not None and is_complete(target):
        return target
    found = complete_checkpoints(root)
    if found and (root / POINTER).exists():
        log.warning("%s names no complete checkpoint; using %s", root / POINTER, found[-1][1])
    return found[-1][1] if found else None


def resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint a resume continues from, or None. Strict, so that a damaged checkpoint is reported
    rather than silently replaced by an older one: ``root/latest`` must be a valid pointer, and the dir it
    names a complete checkpoint. If that dir is gone (moved out as damaged), the newest complete checkpoint
    before it; without a pointer (a crash before the first one was written), the newest complete one."""
    root = Path(root)
    pointer = root / POINTER
    found = complete_checkpoints(root)
    if not os.path.lexists(pointer):
        return found[-1][1] if found else None
    named = check_fields(pointer, read_json(pointer), POINTER_SCHEMA)
    target = root / named["dir"]
    if target.is_dir():
        check_complete(target)
        return target
    older = [path for step, path in found if step < named["step"]]
    if not older:
        raise CheckpointError(f"{pointer}: field 'dir' names {named['dir']}, which does not exist, and no complete "
                              f"checkpoint is older; restore {named['dir']}")
    log.warning("%s names %s, which does not exist; resuming from %s", pointer, named["dir"], older[-1])
    return older[-1]


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


# ---- trainer state ---------------------------------------------------------------------------------------


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
    """``directory/trainer_state.json``, checked against its schema (``checkpoint_schema.TRAINER_STATE``)."""
    path = Path(directory) / "trainer_state.json"
    return TrainerState(**check_fields(path, read_json(path), TRAINER_STATE))
