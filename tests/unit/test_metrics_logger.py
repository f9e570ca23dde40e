"""``training.MetricsLogger``: what TensorBoard reads back, a resume hiding the steps it redoes, and a full disk
failing ``log`` itself (naming the file) instead of a background thread printing its traceback."""

import errno
import json
import subprocess
import sys
import textwrap

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chatrlhf.training import MetricsLogger


def _scalars(out, tag):
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_reads_every_finite_scalar_and_a_resume_hides_the_redone_steps(tmp_path):
    first = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss": float(step), "nan": float("nan"), "note": "text"})
    first.close()
    # A crash after step 4; the resume continues from the checkpoint of step 2 and redoes steps 3 and 4.
    resumed = MetricsLogger(tmp_path, start=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()

    assert _scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert "train/nan" not in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert rows[0]["train/note"] == "text"


# In a process of its own: the file-size limit (a full disk, as tests/integration/test_disk_full.py makes one)
# applies to the whole process. close() runs too: SummaryWriter's joins its writer thread there.
_FULL_DISK = """
    import json, resource, signal, sys
    from pathlib import Path
    from chatrlhf.training import MetricsLogger

    logger = MetricsLogger(Path(sys.argv[1]))
    logger.log(1, {"loss": 1.0})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        logger.log(2, {"loss": 2.0})
    except OSError as err:
        print(json.dumps({"errno": err.errno, "file": err.filename}))
    try:
        logger.close()
    except OSError as err:
        print(f"close: {err!r}")
"""


def test_a_full_disk_fails_log_naming_the_file_and_no_thread_prints(tmp_path):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_FULL_DISK), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    failed = json.loads(r.stdout)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert failed == {"errno": errno.EFBIG, "file": str(events)}, r.stdout
    assert _scalars(tmp_path, "train/loss") == [(1, 1.0)]
