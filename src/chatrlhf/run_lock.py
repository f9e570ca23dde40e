"""One writer per output dir: an exclusive lock taken before a run writes anything there.

The lock is ``OUTPUT_DIR/.chatrlhf.lock``, held with ``flock`` for the life of the run and filled with the
holder's pid, host, start time and command. A second run into the same dir stops with one line naming
the holder. The kernel drops an ``flock`` when its process dies, SIGKILL included, so a killed run's lock
is stale by construction: the next run (``--run.resume true``) takes it over and says whose it was. The
file itself stays (emptied on release): deleting a lock file lets two later runs lock two different
inodes of one name.

A process may take the lock of a dir it already holds again (a stage run twice in one process, the
pipeline's stages); :func:`release_all` lets every lock go (``chatrlhf.cli`` calls it when a command ends).
Several processes of one run (the deepspeed launcher) lock once, on rank 0: see
``chatrlhf.training.prepare_output_dir``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from chatrlhf.config import ConfigError

LOCK_NAME = ".chatrlhf.lock"
_held: dict[Path, int] = {}  # resolved output dir -> fd of its lock file, for this process


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it wrote no details yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')} since {started} ({str(info.get('command', ''))[:200]})"


def _command() -> str:
    program = Path(sys.argv[0]).name
    first = "chatrlhf" if program in ("chatrlhf", "cli.py", "__main__.py") else sys.argv[0]
    return shlex.join([first, *sys.argv[1:]])


def acquire(out_dir: str | os.PathLike, flag: str = "--run.output_dir") -> None:
    """Takes the lock of ``out_dir`` (created if needed) or raises ConfigError naming the run holding it."""
    out = Path(out_dir).resolve()
    if out in _held:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{flag} {out_dir} is in use by another run: {_holder_text(path)}. Fix: wait for it to "
                          f"finish (or stop it), or choose another {flag}") from None
    except OSError as err:  # a file system without flock (some network or FUSE mounts)
        os.close(fd)
        raise ConfigError(f"{flag} {out_dir}: cannot lock {path} ({err.strerror}); runs need a file system with "
                          f"file locks. Fix: choose another {flag} on a local disk") from None
    stale = os.pread(fd, 4096, 0)
    if stale.strip():
        print(f"[chatrlhf] {out}: taking over the lock of a run that is gone: {_holder_text(path)}", file=sys.stderr)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
            "command": _command()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    _held[out] = fd


def release(out_dir: str | os.PathLike) -> None:
    """Empties and unlocks ``out_dir``'s lock if this process holds it."""
    fd = _held.pop(Path(out_dir).resolve(), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def release_all() -> None:
    for out in list(_held):
        release(out)


def held(out_dir: str | os.PathLike) -> bool:
    return Path(out_dir).resolve() in _held
