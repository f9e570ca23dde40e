"""The disk fills up during a save: the run stops with one line naming the file it could not write, the last
complete checkpoint stays ``latest``, the finished model of an earlier run in the output dir is untouched,
and ``--run.resume true`` with space back finishes the run exactly as if nothing had happened.

The full disk is a file-size limit (RLIMIT_FSIZE) set in the run's own process at one moment of the run
(crash_worker.fill_disk), so the real writes fail in the real code: safetensors' Rust writer for tensor files,
Python's for JSON. 64 KiB leaves room for the small files (metrics rows, JSON) but not for a tensor file; 0
leaves room for nothing. The output dir first holds an earlier, finished run (another learning rate) that the
failing run replaces with ``--run.overwrite true``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from crash_worker import FULL_STEP
from fresh_process import run_cli
from safetensors.torch import load_file
from tiny_data import copy_rows, train_rows, write_jsonl

from chatrlhf import checkpoint
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow

CASES = {
    # moment the disk fills -> (bytes left, the file that cannot be written, the checkpoint latest then names)
    "checkpoint": (64 << 10, r"checkpoints/tmp-4-\d+/model\.safetensors", 2),
    "trainer_state": (0, r"checkpoints/tmp-4-\d+/trainer_state\.json", 2),
    "final_model": (64 << 10, r"\.model\.tmp-\d+/model\.safetensors", 4),
}
SCRATCH = re.compile(r"^(tmp|trash)-\d+-\d+$|^\..+\.(tmp|old)-\d+$")  # checkpoint.py's scratch names


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """``flags(out, lr)``: the SFT command line (6 steps, saves after steps 2 and 4)."""
    base = tmp_path_factory.mktemp("disk_full")
    model = str(build_tiny_llama(base / "model"))
    data = write_jsonl(base / "copy.jsonl", copy_rows(48))  # 6 steps of 8

    def make(out: Path, lr: str = "3e-3") -> list[str]:
        return [
            "sft", "--model.name_or_path", model, "--data.datasets", f"[{data}]", "--data.data_split", "1,0,0",
            "--run.output_dir", str(out), "--run.progress", "false", "--engine.learning_rate", lr,
            "--engine.micro_batch_size", "8", "--max_steps", "6", "--run.save_every", "2", "--run.keep_last", "2",
        ]  # fmt: skip

    return make


@pytest.fixture(scope="module")
def runs(flags, tmp_path_factory) -> tuple[Path, Path]:
    """(the uninterrupted run, an earlier finished run with another learning rate)."""
    base = tmp_path_factory.mktemp("runs")
    for out, lr in ((base / "reference", "3e-3"), (base / "earlier", "1e-3")):
        r = run_cli(flags(out, lr))
        assert r.returncode == 0, r.output[-3000:]
    return base / "reference", base / "earlier"


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("at", list(CASES))
def test_disk_full_keeps_the_last_checkpoint_and_resume_finishes(at, flags, runs, tmp_path):
    left, unwritable, want = CASES[at]
    reference, earlier = runs
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    earlier_model = files(earlier / "model")

    full = run_cli([*flags(out), "--run.overwrite", "true"], setup=("crash_worker", "fill_disk", (at, left)))

    # One line: the file, "disk full", and what to do; no traceback, no crash.
    errors = [line for line in full.output.splitlines() if line.startswith("chatrlhf sft: error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.output, full.output[-3000:]
    assert re.search(rf"could not write {re.escape(str(out))}/{unwritable}: disk full \(File too large", errors[0]), (
        errors[0]
    )
    assert "--run.resume true" in errors[0], errors[0]

    # The last complete checkpoint is latest, and it is this run's (the same bytes as the reference run's);
    # the failed save left no step dir (--run.overwrite removed the earlier run's checkpoints when it started);
    # the earlier run's finished model is untouched.
    root = out / "checkpoints"
    latest = checkpoint.latest_checkpoint(root)
    assert latest == root / f"step-{want}" and checkpoint.load_trainer_state(latest).step == want, latest
    assert files(latest)["model.safetensors"] == files(reference / "checkpoints" / f"step-{want}")["model.safetensors"]
    assert all(checkpoint.is_complete(p) for p in root.glob("step-*")), sorted(root.iterdir())
    if want < FULL_STEP:
        assert not (root / "step-4").exists(), sorted(root.iterdir())
    # The failed save removed its own tmp dir at once: on a full disk it holds the space a rerun needs.
    assert not list(root.glob("tmp-*")), sorted(root.iterdir())
    assert not list(out.glob(".model.tmp-*")), sorted(out.iterdir())  # a failed final save removes its copy
    assert files(out / "model") == earlier_model

    resumed = run_cli([*flags(out), "--run.resume", "true"])
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {latest} at step {want}" in resumed.output, resumed.output[-3000:]
    assert train_rows(out) == train_rows(reference)
    got, ref = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((out / "eval.json").read_text())["loss"] == json.loads((reference / "eval.json").read_text())["loss"]
    leftover = [p.name for d in (out, root) for p in d.iterdir() if SCRATCH.match(p.name)]
    assert leftover == [], leftover


# ---- the message for each way a full disk shows up (in-process, the stage replaced by one failing write) -----


def _python_write(path: Path) -> None:
    with open(path, "w") as f:
        f.write("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises then: no file name


def _safetensors_write(path: Path) -> None:
    from safetensors import SafetensorError

    def save_file(tensors, filename):  # safetensors' own: its Rust error has no errno and no path
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    save_file({}, str(path))


@pytest.mark.parametrize("write", [_python_write, _safetensors_write])
def test_no_space_left_is_one_line_naming_the_file(write, flags, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    target = out / "metrics.jsonl"

    def stage(cfg):
        out.mkdir()
        write(target)

    monkeypatch.setattr("chatrlhf.stages.sft.train_sft", stage)
    assert main(flags(out)) == 2
    err = capsys.readouterr().err
    assert err == (f"chatrlhf sft: error: could not write {target}: disk full (No space left on device). Fix: free "
                   f"space on the disk of {out}, then run the same command with --run.resume true: it continues from "
                   "the last complete checkpoint.\n")


def test_other_errors_are_not_called_disk_full(flags, tmp_path, monkeypatch, capsys):
    def denied(cfg):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr("chatrlhf.stages.sft.train_sft", denied)
    assert main(flags(tmp_path / "run")) == 2
    assert capsys.readouterr().err == f"chatrlhf sft: error: [Errno 13] Permission denied: '{tmp_path}'\n"

    def bug(cfg):
        raise RuntimeError("a bug: its traceback is wanted")

    monkeypatch.setattr("chatrlhf.stages.sft.train_sft", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(flags(tmp_path / "run"))
