"""One writer per output dir (chatrlhf.run_lock): a second run into a dir in use stops with one line naming the
holder and changes nothing; a SIGKILLed holder's lock is stale, so ``--run.resume true`` continues its run;
under the launcher, rank 0 locks and every rank stops together."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hostile import copy_rows, run_cli, sft_flags

from chatrlhf import run_lock

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HOLD = ("import sys, time\nfrom chatrlhf import run_lock\nrun_lock.acquire(sys.argv[1])\nprint('locked', flush=True)\n"
        "time.sleep(600)\n")


def _data(root: Path) -> Path:
    path = root / "copy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in copy_rows(16)))
    return path


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _locked_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_lock_is_reentrant_in_one_process_and_emptied_on_release(tmp_path):
    run_lock.acquire(tmp_path / "out")
    run_lock.acquire(tmp_path / "out")  # the pipeline's stages, a stage run twice in one process
    info = json.loads((tmp_path / "out" / run_lock.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["command"]
    run_lock.release_all()
    assert (tmp_path / "out" / run_lock.LOCK_NAME).read_text() == "" and not run_lock.held(tmp_path / "out")


def test_a_second_run_into_a_running_runs_dir_stops_and_changes_nothing(tmp_path, tiny_model, capsys):
    data, out = _data(tmp_path), tmp_path / "out"
    flags = [*sft_flags(tiny_model, data, out)]
    flags[flags.index("--max_steps") + 1] = "150"  # long enough to be still running when the second starts
    flags[flags.index("--run.save_every") + 1] = "50"
    first = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "sft", *flags], env=ENV, cwd=tmp_path,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: f'"pid": {first.pid}' in _read(out / run_lock.LOCK_NAME), "the first run's lock", first)
        code, stderr = run_cli(["sft", *sft_flags(tiny_model, data, out), "--run.overwrite", "true"], capsys)
        line = _locked_line(stderr)
        assert code == 2 and f"pid {first.pid}" in line and "in use by another run" in line, line
        assert "(chatrlhf sft --model.name_or_path" in line, line  # the holder's command
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert (out / "model" / "config.json").is_file()
    written = yaml.safe_load((out / "config.yaml").read_text())  # the first run's, never the second's
    assert written["max_steps"] == 150 and written["run"]["overwrite"] is False


def test_a_killed_runs_lock_is_stale_and_resume_continues(tmp_path, tiny_model, capsys):
    data, out = _data(tmp_path), tmp_path / "out"
    flags = [*sft_flags(tiny_model, data, out)]
    flags[flags.index("--max_steps") + 1] = "60"
    flags[flags.index("--run.save_every") + 1] = "5"
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "sft", *flags], env=ENV, cwd=tmp_path,
                            stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "checkpoints" / "latest").is_file(), "a checkpoint of the run to kill", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if (out / "model" / "config.json").exists():
        pytest.skip("the run finished before the kill landed")
    assert f'"pid": {proc.pid}' in (out / run_lock.LOCK_NAME).read_text()  # what the dead holder left
    code, stderr = run_cli(["sft", *flags, "--run.resume", "true"], capsys)
    assert code == 0, stderr
    assert "taking over the lock of a run that is gone" in stderr and f"pid {proc.pid}" in stderr
    assert (out / "model" / "config.json").is_file()


def test_pipeline_into_a_locked_dir_stops_before_any_stage(tmp_path, capsys):
    holder = _holder(tmp_path / "pipe")
    try:
        code, stderr = run_cli(["train", "--preset", "smoke", "--run.output_dir", str(tmp_path / "pipe")], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"pid {holder.pid}" in _locked_line(stderr)
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == [run_lock.LOCK_NAME]


def test_launched_ranks_all_stop_when_rank_0_finds_the_dir_locked(tmp_path, tiny_model):
    from test_scale import free_port

    out = tmp_path / "out"
    holder = _holder(out)
    launch = [sys.executable, "-m", "chatrlhf.cli", "launch", "--num_gpus", "2", "--master_port", str(free_port()),
              "--"]
    try:
        proc = subprocess.run([*launch, "sft", *sft_flags(tiny_model, _data(tmp_path), out)], env=ENV, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    # Both ranks report (counted, not split into lines: two processes' writes to one pipe can interleave).
    assert proc.stderr.count("in use by another run") == 2, proc.stderr
    assert proc.stderr.count(f"pid {holder.pid} on") == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_NAME]
