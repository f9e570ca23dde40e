"""SIGKILL at each phase of a checkpoint save: the previous checkpoint stays usable and a resumed run
reproduces the uninterrupted run's loss curve and final weights bit for bit.

Each case runs the CLI with tests/integration/crash_worker.py's hooks, which kill the process (SIGKILL: no
cleanup code runs) at one phase of the save of step 4, or of the final model save, and then restarts the run
with ``--run.resume true`` in a fresh process (both forked by ``fresh_process.run_cli``).
``--run.keep_last 1`` makes rotation delete step-2 right after step-4 is committed, the case where a wrong
order would lose every checkpoint.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fresh_process import Result, run_cli
from tiny_data import copy_rows

from chatrlhf import checkpoint
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow

KILLED_STEP = 4  # saves happen after steps 2 and 4 (--max_steps 6 --run.save_every 2; none at the last step)
# The checkpoint ``latest_checkpoint`` must pick after the kill. Up to the rename, step-4 does not exist;
# at pointer_tmp it does, complete, but the pointer still names step-2, and the pointer is what decides.
LATEST_AFTER_KILL = {
    "begin": 2, "weights": 2, "optimizer": 2, "rng": 2, "manifest": 2, "pointer_tmp": 2,
    "rotate": 4, "final_model": 4,
}  # fmt: skip
SCRATCH = re.compile(r"^\..+\.(tmp|old)-\d+$")  # an atomic write's or publish_dir's scratch (.model.tmp-PID)


def _train_curve(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (train/loss, train/grad_norm); a resumed run logs steps again, so the last row wins."""
    curve = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            curve[row["step"]] = (row["train/loss"], row["train/grad_norm"])
    return curve


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """``flags(out)``: the SFT command line for output dir ``out`` (tiny model, copy-task data)."""
    base = tmp_path_factory.mktemp("crash")
    model = str(build_tiny_llama(base / "model"))
    data = base / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in copy_rows(48)))  # 6 steps of 8 per epoch

    def make(out: Path) -> list[str]:
        return [
            "sft",
            "--model.name_or_path", model,
            "--data.datasets", f"[{data}]",
            "--data.data_split", "1,0,0",
            "--run.output_dir", str(out),
            "--run.progress", "false",
            "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", "8",
            "--max_steps", "6", "--run.save_every", "2", "--run.keep_last", "1",
        ]  # fmt: skip

    return make


@pytest.fixture(scope="module")
def reference(flags, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(flags(out)) == 0
    assert sorted(_train_curve(out)) == [1, 2, 3, 4, 5, 6]
    return out


@dataclass
class Crash:
    out: Path
    killed: Result
    # Right after the kill (the resume rotates step-2 away, so it is looked at before):
    latest: Path | None  # what latest_checkpoint() picks
    latest_complete: bool  # is_complete() of it
    latest_step: int | None  # the step its trainer_state.json records
    entries: list[str]  # the names in checkpoints/
    out_entries: list[str]  # the names in the output dir
    resumed: Result


@pytest.fixture(scope="module")
def crash(flags, tmp_path_factory):
    """``crash(phase)``: kill at ``phase``, inspect, resume; run once per phase and shared by the tests."""
    done: dict[str, Crash] = {}

    def run(phase: str) -> Crash:
        if phase not in done:
            out = tmp_path_factory.mktemp(f"crash-{phase}") / "run"
            killed = run_cli(flags(out), setup=("crash_worker", "install", (phase, KILLED_STEP)))
            root = out / "checkpoints"
            latest = checkpoint.latest_checkpoint(root)
            complete = latest is not None and checkpoint.is_complete(latest)
            step = checkpoint.load_trainer_state(latest).step if complete else None
            entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            out_entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            resumed = run_cli([*flags(out), "--run.resume", "true"])
            done[phase] = Crash(out, killed, latest, complete, step, entries, out_entries, resumed)
        return done[phase]

    return run


@pytest.mark.parametrize("phase", list(LATEST_AFTER_KILL))
def test_kill_leaves_previous_checkpoint_and_resume_matches(phase, crash, reference):
    c = crash(phase)
    assert c.killed.returncode == -signal.SIGKILL, (c.killed.returncode, c.killed.output[-3000:])

    # What the kill left: a complete checkpoint that latest_checkpoint() picks, never the half-written one.
    want = LATEST_AFTER_KILL[phase]
    assert c.latest == c.out / "checkpoints" / f"step-{want}", (c.latest, c.entries)
    assert c.latest_complete and c.latest_step == want, (c.latest_complete, c.latest_step)
    if want == 2 and phase != "pointer_tmp":  # killed before the rename: step-4 must not exist yet
        assert "step-4" not in c.entries and any(e.startswith("tmp-4-") for e in c.entries), c.entries
    if phase == "final_model":  # the half-written model was never renamed into place
        assert "model" not in c.out_entries and any(e.startswith(".model.tmp-") for e in c.out_entries), (
            c.out_entries
        )

    assert c.resumed.returncode == 0, c.resumed.output[-3000:]
    assert f"resumed from {c.latest} at step {want}" in c.resumed.output

    # Same loss curve, same final weights, same held-out loss as the run that was never interrupted.
    assert _train_curve(c.out) == _train_curve(reference)
    got, ref = _weights(c.out), _weights(reference)
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    eval_loss = json.loads((c.out / "eval.json").read_text())["loss"]
    assert eval_loss == json.loads((reference / "eval.json").read_text())["loss"]


@pytest.mark.parametrize("phase", list(LATEST_AFTER_KILL))
def test_resumed_run_leaves_no_scratch(phase, crash):
    c = crash(phase)
    assert c.resumed.returncode == 0, c.resumed.output[-3000:]
    assert sorted(p.name for p in (c.out / "checkpoints").iterdir()) == ["latest", "step-4"]
    scratch = [p.name for p in c.out.iterdir() if SCRATCH.match(p.name)]
    assert scratch == [], scratch
