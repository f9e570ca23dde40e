"""Counts the moments of a PPO/GRPO run, and SIGKILLs the run at the N-th one.

Started by tests/integration/test_crash_rl.py in a child of ``fresh_process.run_cli``:
``install(N, None)`` kills at event N; ``install(None, TRACE)`` lets the run finish and writes every
event to the JSON file ``TRACE``, so the test can draw N among the events of one kind and know in
advance which moment it hits. The runs are deterministic, so event N of a traced run is event N of a
killed one (the killed run prints its label before dying, and the test checks it).

Events, each with the label the test prints:
    generate   one forward of the actor while it generates a rollout (prefill or one decoding step)
    update     one ``Engine.step()`` of the actor or the critic in the PPO epochs (after it ran)
    write      a file of the run written: a metrics row, each file of a checkpoint (the kill cuts a tensor
               file to half its size first, as a writer killed mid-file leaves it), each phase of its
               commit, and the final model, critic and eval.json

SIGKILL cannot be caught: no ``finally`` block, ``atexit`` hook or buffered write runs, which is what a
power cut, the OOM killer or a preempted node does to a training job. The hooks wrap module attributes
the code under test calls through (``ckpt.<name>``, ``tensor_files.<name>``, ``Engine.step``, ...), so
that code runs unchanged; a hook that stops matching fails the test (the killed run exits with status
``NOT_REACHED`` instead of being killed, or prints another label).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

KINDS = ("generate", "update", "write")
NOT_REACHED = 3
_TMP = re.compile(r"^tmp-(\d+)-\d+$")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _in_checkpoint(path) -> str:
    """A file's path inside the checkpoint being written (``actor/model.safetensors``): pid-free, so the
    labels of two runs compare equal."""
    parts = Path(path).parts
    at = next((i for i, p in enumerate(parts) if _TMP.match(p)), len(parts) - 2)
    return "/".join(parts[at + 1 :])


class Trap:
    """Counts the events (``event``) of one run and kills it at event ``kill_at``; ``after`` writes the trace."""

    def __init__(self, kill_at: int | None, trace: str | None):
        self.kill_at, self.trace = kill_at, trace
        self.events: list[dict] = []
        self.iteration = 0  # 1-based, as the metrics' step
        self.saving = 0  # the step whose checkpoint is being written
        self.latest = 0  # the step the ``latest`` pointer names (0: none yet)
        self.rotating = False

    def event(self, kind: str, what: str, cut: Path | None = None) -> None:
        label = f"{kind}: iteration {self.iteration}: {what}"
        self.events.append({"kind": kind, "label": label, "latest": self.latest})
        if len(self.events) == self.kill_at:
            if cut is not None:  # the right name and header, the tail missing
                with open(cut, "r+b") as f:
                    f.truncate(cut.stat().st_size // 2)
            print(f"rl_crash_worker: SIGKILL at event {self.kill_at}: {label}")
            _die()

    def after(self, rc: int) -> int:
        if self.trace is not None:
            Path(self.trace).write_text(json.dumps(self.events, indent=0))
        if rc == 0 and self.kill_at is not None:
            print(f"rl_crash_worker: event {self.kill_at} never came ({len(self.events)} events)", file=sys.stderr)
            return NOT_REACHED
        return rc

    # ---- hooks -------------------------------------------------------------------------------------------

    def install(self) -> None:
        from chatrlhf import checkpoint as ckpt
        from chatrlhf import resume, tensor_files, training
        from chatrlhf.engine.engine import Engine
        from chatrlhf.rollout import hybrid
        from chatrlhf.stages import ppo

        _around(ppo, "generate_rollouts", self._generate_rollouts)
        _around(hybrid, "generate", self._generate)
        _around(Engine, "step", self._engine_step)
        _around(training.MetricsLogger, "log", self._log)
        _around(ckpt, "begin_step", self._begin_step)
        _around(tensor_files, "save_weights", self._save_weights)
        _around(resume, "save_weights", self._save_weights)  # the EMA weights, imported by name there
        _around(tensor_files, "save_tensor_tree", self._save_tensor_tree)
        _around(ckpt, "save_trainer_state", self._save_trainer_state)
        _around(ckpt, "publish_dir", self._publish_dir)
        _around(ckpt, "rotate", self._rotate)
        _around(resume, "write_json_atomic", self._write_eval)
        _around(os, "replace", self._replace)
        _around(os, "rename", self._rename)

    def _generate_rollouts(self, real, run, iteration):
        self.iteration = iteration + 1
        return real(run, iteration)

    def _generate(self, real, model, *args, **kwargs):
        forwards = 0

        def hook(*_):
            nonlocal forwards
            forwards += 1
            self.event("generate", f"forward {forwards} of the rollout")

        handle = model.register_forward_hook(hook)
        try:
            return real(model, *args, **kwargs)
        finally:
            handle.remove()

    def _engine_step(self, real, engine, *args, **kwargs):
        applied = real(engine, *args, **kwargs)
        what = "optimizer step" if applied else "accumulating"
        self.event("update", f"{type(engine.module).__name__}.step() #{engine._ds.micro_steps} ({what})")
        return applied

    def _log(self, real, logger, step, metrics, prefix="train"):
        real(logger, step, metrics, prefix)
        if prefix == "train":
            self.event("write", f"metrics row of step {step} written")

    def _begin_step(self, real, root, step):
        self.saving = step
        tmp = real(root, step)
        self.event("write", f"save of step-{step}: tmp dir created")
        return tmp

    def _save_weights(self, real, state, path):
        real(state, path)
        self.event("write", f"save of step-{self.saving}: {_in_checkpoint(path)} written", cut=Path(path))

    def _save_tensor_tree(self, real, tree, directory, name):
        real(tree, directory, name)
        path = Path(directory) / f"{name}.safetensors"
        self.event("write", f"save of step-{self.saving}: {_in_checkpoint(path)} (+ .json) written", cut=path)

    def _save_trainer_state(self, real, directory, state):
        real(directory, state)
        self.event("write", f"save of step-{self.saving}: trainer_state.json written")

    def _publish_dir(self, real, tmp, final):
        name = Path(final).name
        if name.startswith("step-"):
            self.event("write", f"save of {name}: manifest written, tmp dir not yet renamed to {name}")
        else:  # the final save_hf of model/ or critic/
            self.event("write", f"final {name}/ written under its tmp name, not yet renamed",
                       cut=Path(tmp) / "model.safetensors")
        real(tmp, final)

    def _rotate(self, real, root, keep_last):
        self.rotating = True
        try:
            return real(root, keep_last)
        finally:
            self.rotating = False

    def _write_eval(self, real, path, obj):
        real(path, obj)
        self.event("write", f"final {Path(path).name} written: the run is complete")

    def _replace(self, real, src, dst, *args, **kwargs):
        if Path(dst).name == "latest":
            self.event("write", f"save of step-{self.saving}: step dir renamed in, pointer in its tmp file, "
                       "not yet replaced")
            real(src, dst, *args, **kwargs)
            self.latest = self.saving
            return None
        return real(src, dst, *args, **kwargs)

    def _rename(self, real, src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if self.rotating:
            self.event("write", f"save of step-{self.saving}: rotation renamed {Path(src).name} to "
                       f"{Path(dst).name}, not yet deleted")


def _around(owner, name: str, hook) -> None:
    """``owner.name(*args)`` becomes ``hook(real, *args)`` (methods too: the instance is the first arg)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        return hook(real, *args, **kwargs)

    setattr(owner, name, wrapper)


def install(kill_at: int | None, trace: str | None):
    """The ``setup`` of ``fresh_process.run_cli``: hooks in, and the check to run after the CLI."""
    trap = Trap(kill_at, trace)
    trap.install()
    return trap.after
