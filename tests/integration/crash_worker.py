"""Runs the ``chatrlhf`` CLI and SIGKILLs itself at one phase of one checkpoint save.

    python tests/integration/crash_worker.py PHASE STEP -- sft --model.name_or_path DIR ...

tests/integration/test_crash_safety.py runs it in a fresh process without the interpreter's start-up, as
``fresh_process.run_cli(argv, setup=("crash_worker", "install", (PHASE, STEP)))``. Saves of other steps
complete normally; the save of checkpoint ``STEP`` is cut at ``PHASE`` (``final_model`` ignores ``STEP``: it
cuts the final model save). SIGKILL is used because it cannot be caught: no ``finally`` block, ``atexit``
hook or buffered write runs, which is what a power cut, the OOM killer or a preempted node does to a
training job.

The hooks wrap the functions of ``chatrlhf.checkpoint`` and ``chatrlhf.tensor_files`` that
``chatrlhf.engine.state.save_engines`` and ``Engine.save_hf`` call through those modules (``ckpt.<name>``,
``tensor_files.<name>``), plus ``os.rename``/``os.replace``, so the code under test runs unchanged. If the
phase is never reached the worker exits with status 3, so a hook that stops matching the save protocol
fails the test instead of passing it vacuously.

``fill_disk`` (tests/integration/test_disk_full.py) is the other way a save fails: the disk fills up.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Save order of save_engines (begin .. rotate), then the final Engine.save_hf.
PHASES = {
    "begin": "tmp-<step>-<pid> created, still empty",
    "weights": "model.safetensors cut to half its size, nothing after it written",
    "optimizer": "weights written; optimizer.safetensors cut to half, optimizer.json not written",
    "rng": "engine state (weights, optimizer, scheduler, counters) written; RNG and trainer state not",
    "manifest": "manifest.json written, tmp dir not yet renamed to step-<step>",
    "pointer_tmp": "step-<step> renamed in; pointer tmp file written and fsynced, not yet os.replace'd",
    "rotate": "pointer committed; the old checkpoint renamed to trash-<step>-<pid>, not yet deleted",
    "final_model": "training done; model/ written under its tmp name with model.safetensors cut to half",
}
NOT_REACHED = 3


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_in_half(path: Path) -> None:
    # A file a killed writer left behind: the right name, a plausible header, the tail missing.
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


class Trap:
    """Wrappers around the save protocol that kill the process at ``phase`` of the save of ``step``."""

    def __init__(self, phase: str, step: int):
        from chatrlhf import checkpoint as ckpt
        from chatrlhf import tensor_files

        if phase not in PHASES:
            raise SystemExit(f"crash_worker: unknown PHASE {phase!r}; choose one of {', '.join(PHASES)}")
        self.ckpt, self.tensor_files, self.phase, self.step = ckpt, tensor_files, phase, step
        self.saving: int | None = None  # the step whose checkpoint is being written
        self.rotating = False  # inside checkpoint.rotate()
        self.real = {
            "begin_step": ckpt.begin_step,
            "save_weights": tensor_files.save_weights,
            "save_tensor_tree": tensor_files.save_tensor_tree,
            "save_rng_state": tensor_files.save_rng_state,
            "publish_dir": ckpt.publish_dir,
            "rotate": ckpt.rotate,
            "replace": os.replace,
            "rename": os.rename,
        }

    def at(self, phase: str) -> bool:
        return self.phase == phase and self.saving == self.step

    def install(self) -> None:
        # The engine calls these as ckpt.<name> / tensor_files.<name>, and commit_step() and
        # save_rng_state() look their helpers up in their module's globals, so replacing the module
        # attributes reaches every call.
        for name in ("begin_step", "publish_dir", "rotate"):
            setattr(self.ckpt, name, getattr(self, name))
        for name in ("save_weights", "save_tensor_tree", "save_rng_state"):
            setattr(self.tensor_files, name, getattr(self, name))
        os.replace, os.rename = self.replace, self.rename

    def begin_step(self, root, step):
        self.saving = step
        tmp = self.real["begin_step"](root, step)
        if self.at("begin"):
            _die()
        return tmp

    def save_weights(self, state, path):
        self.real["save_weights"](state, path)
        if self.at("weights"):
            _cut_in_half(Path(path))
            _die()

    def save_tensor_tree(self, tree, directory, name):
        self.real["save_tensor_tree"](tree, directory, name)
        if self.at("optimizer") and name.startswith("optimizer"):
            _cut_in_half(Path(directory) / f"{name}.safetensors")
            (Path(directory) / f"{name}.json").unlink()  # written after the tensors: not there yet
            _die()

    def save_rng_state(self, directory, rank=0):
        if self.at("rng"):
            _die()
        self.real["save_rng_state"](directory, rank)

    def publish_dir(self, tmp, final):
        if self.at("manifest") and Path(final).name == f"step-{self.step}":
            assert (Path(tmp) / self.ckpt.MANIFEST).is_file(), (
                "publish_dir called before the manifest was written"
            )
            _die()
        if self.phase == "final_model" and Path(final).name == "model":
            _cut_in_half(Path(tmp) / "model.safetensors")
            _die()
        self.real["publish_dir"](tmp, final)

    def rotate(self, root, keep_last):
        self.rotating = True
        try:
            return self.real["rotate"](root, keep_last)
        finally:
            self.rotating = False

    def replace(self, src, dst, *args, **kwargs):
        if self.at("pointer_tmp") and Path(dst).name == self.ckpt.POINTER:
            assert Path(src).is_file(), f"pointer tmp file {src} missing"
            _die()
        return self.real["replace"](src, dst, *args, **kwargs)

    def rename(self, src, dst, *args, **kwargs):
        self.real["rename"](src, dst, *args, **kwargs)
        if self.at("rotate") and self.rotating:
            _die()


# ---- a disk that fills up (tests/integration/test_disk_full.py) ---------------------------------------------

FILL_AT = {
    "checkpoint": "the save of step FULL_STEP begins (ckpt.begin_step)",
    "trainer_state": "the save of step FULL_STEP writes trainer_state.json (ckpt.save_trainer_state)",
    "final_model": "training is done; the final model save begins (Engine.save_hf)",
}
FULL_STEP = 4


def fill_disk(at: str, limit: int):
    """The ``setup`` of ``fresh_process.run_cli``: from the moment ``at`` (FILL_AT) on, no file this process
    writes may grow past ``limit`` bytes (RLIMIT_FSIZE), as on a disk with ``limit`` bytes left. SIGXFSZ is
    ignored, so a write past it fails with EFBIG instead of killing the process; everything else, and the
    code under test, is unchanged."""
    import resource

    from chatrlhf import checkpoint as ckpt
    from chatrlhf.engine.engine import Engine

    if at not in FILL_AT:
        raise SystemExit(f"crash_worker: unknown fill moment {at!r}; choose one of {', '.join(FILL_AT)}")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def fill() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def hook(owner, name: str, moment: str, when=lambda *args: True) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if at == moment and when(*args):
                fill()
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    hook(ckpt, "begin_step", "checkpoint", lambda root, step: step == FULL_STEP)
    hook(ckpt, "save_trainer_state", "trainer_state", lambda directory, state: state.step == FULL_STEP)
    hook(Engine, "save_hf", "final_model")


def install(phase: str, step: int):
    """The ``setup`` of ``fresh_process.run_cli``: the trap in, and the check that it fired."""
    Trap(phase, step).install()

    def after(rc: int) -> int:
        if rc != 0:
            return rc
        print(f"crash_worker: phase {phase!r} of the save of step {step} was never reached", file=sys.stderr)
        return NOT_REACHED

    return after


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        print("usage: crash_worker.py PHASE STEP -- <chatrlhf arguments>", file=sys.stderr)
        return 2
    phase, step = argv[0], int(argv[1])
    Trap(phase, step).install()
    from chatrlhf.cli import main as cli_main

    rc = cli_main(argv[3:])
    if rc != 0:
        return rc
    print(f"crash_worker: phase {phase!r} of the save of step {step} was never reached", file=sys.stderr)
    return NOT_REACHED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
