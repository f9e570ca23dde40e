"""Runs the ``chatrlhf`` CLI in a fresh process, a second or so per run instead of the ~5 s of a new
interpreter importing torch, DeepSpeed and transformers.

A multiprocessing fork server imports those libraries once and does nothing else: no model is built and
no run starts in it. ``run_cli`` forks a child from it for every run, so each run starts in a process of
its own with none of another run's state, as a job restarted after a crash does. The child's stdout and
stderr go to a pipe (a pipe, not a file: the disk-full tests limit the size of every file the child
writes). A child killed by a signal is reaped by the server before ``run_cli`` returns, so its pid is
gone and ``checkpoint.clean_stale`` takes the scratch it left for stale, as after a real crash.

``setup`` names a function run in the child before the CLI, ``(module, function, args)``: it installs
the hooks of a crash or disk-full test and returns ``after(returncode) -> returncode`` (or None), run
once the CLI has returned.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import select
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
PRELOAD = [
    "torch", "deepspeed", "transformers", "transformers.models.llama.modeling_llama", "tensorboard",
    "chatrlhf.cli", "chatrlhf.stages.sft", "chatrlhf.stages.ppo", "rl_crash_worker",
]  # fmt: skip


@dataclass
class Result:
    returncode: int  # as subprocess's: -N when signal N killed the child
    output: str  # stdout and stderr, interleaved


def _context():
    ctx = multiprocessing.get_context("forkserver")
    # The server takes sys.path from the process that starts it; this dir must be on it for the setups.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_cli(argv: list[str], setup: tuple[str, str, tuple] | None = None, timeout: float = 300) -> Result:
    """``chatrlhf <argv>`` in a child forked from the server; returns its exit status and output."""
    ctx = _context()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(writer, list(argv), setup))
    proc.start()
    writer.close()  # the child holds the only write end now: EOF comes when it exits
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                raise TimeoutError(f"chatrlhf {' '.join(argv[:1])} ran past {timeout} s:\n" +
                                   b"".join(chunks).decode(errors="replace")[-3000:])
            data = os.read(reader.fileno(), 1 << 16)
            if not data:
                break
            chunks.append(data)
        proc.join(timeout=30)
    finally:
        reader.close()
    return Result(proc.exitcode, b"".join(chunks).decode(errors="replace"))


def _child(writer, argv: list[str], setup) -> None:
    os.dup2(writer.fileno(), 1)
    os.dup2(writer.fileno(), 2)
    writer.close()
    import torch

    torch.set_num_threads(1)  # as tests/conftest.py: tiny models, a 2-core machine
    after = getattr(importlib.import_module(setup[0]), setup[1])(*setup[2]) if setup else None
    from chatrlhf.cli import main

    rc = main(argv)
    if after is not None:
        rc = after(rc)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(rc)
