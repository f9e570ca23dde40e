"""Pieces every training loop shares: output dirs, metrics, batch schedules (resuming is ``chatrlhf.resume``).

Orchestration only; the math lives in ``chatrlhf.algorithms`` and DeepSpeed in ``chatrlhf.engine``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from chatrlhf.config import ConfigError, RunConfig

MODEL_SUBDIR = "model"
CHECKPOINTS_SUBDIR = "checkpoints"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lock_output_dir(out: Path, flag: str = "--run.output_dir") -> None:
    """One writer per output dir (``chatrlhf.run_lock``): rank 0 takes the lock; with several processes every
    rank learns whether it got it, so all stop together, with the same message, when another run holds it."""
    import torch.distributed as dist

    from chatrlhf import run_lock

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    error = None
    if not several or dist.get_rank() == 0:
        try:
            run_lock.acquire(out, flag)
        except ConfigError as err:
            error = str(err)
    if several:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)


def prepare_output_dir(run: RunConfig) -> Path:
    """Lock ``run.output_dir`` (creating it), then refuse to clobber a finished model unless asked.

    With ``overwrite`` the old model stays in place until the new one is complete (``Engine.save_hf``
    writes to a temporary dir and renames), so a failed run never leaves the dir without a model.
    """
    out = Path(run.output_dir)
    lock_output_dir(out)  # before the checks: a run writing here now would make them stale at once
    if (out / MODEL_SUBDIR / "config.json").exists() and not (run.overwrite or run.resume):
        raise ConfigError(
            f"{out / MODEL_SUBDIR} already holds a finished model. Pass --run.overwrite true to replace it "
            f"(the old one is kept until the new one is complete), --run.resume true to continue, "
            f"or choose another --run.output_dir."
        )
    from chatrlhf import run_lock
    from chatrlhf.checkpoint import clean_stale, complete_checkpoints

    found = complete_checkpoints(out / CHECKPOINTS_SUBDIR)
    if found and not (run.overwrite or run.resume):
        raise ConfigError(
            f"{out / CHECKPOINTS_SUBDIR} holds checkpoints of an earlier run (latest: step {found[-1][0]}). Pass "
            "--run.resume true to continue it, --run.overwrite true to start over (its checkpoints are removed "
            "first), or choose another --run.output_dir."
        )
    if not run.resume:  # a resume cleans once it has checked the checkpoint (chatrlhf.resume._resumed)
        for scratch in (out, out / CHECKPOINTS_SUBDIR):  # what a killed run left half-written
            clean_stale(scratch)
    if found and run.overwrite and not run.resume and run_lock.held(out):  # rank 0, the lock holder
        _retire_checkpoints(out / CHECKPOINTS_SUBDIR, found)
    return out


def _retire_checkpoints(root: Path, found: list[tuple[int, Path]]) -> None:
    """A fresh run (``--run.overwrite``) drops the earlier run's checkpoints before it trains: were it to fail
    before its first save, ``--run.resume`` would otherwise continue the earlier run under the new flags. The
    pointer goes first, then each step dir is renamed to a ``trash-*`` name (what ``clean_stale`` removes after
    a crash) and deleted. The earlier finished model stays until the new one replaces it."""
    import shutil

    from chatrlhf.checkpoint import POINTER

    (root / POINTER).unlink(missing_ok=True)
    for step, path in found:
        trash = root / f"trash-{step}-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    print(f"[chatrlhf] --run.overwrite: removed the earlier run's {len(found)} checkpoint(s) from {root}")


def write_resolved_config(out: Path, cfg) -> None:
    """The exact config the run used, beside its outputs (reloadable with ``--config``)."""
    path = out / "config.yaml"
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False))
    os.replace(tmp, path)


class MetricsLogger:
    """Metrics to ``metrics.jsonl`` (one JSON object per line) and TensorBoard, on rank 0 only.

    ``start`` is the step the run starts (or resumes) at: rows logged after it by an earlier attempt, which
    the resumed run is about to redo, are dropped from both, so every step appears once. ``start`` 0 begins
    a new log.

    Both files are written synchronously, each row in full before ``log`` returns. TensorBoard's own
    SummaryWriter writes from a thread: on a full disk that thread printed its traceback and the run went on
    unaware. Here a failed write raises from ``log`` as an ``OSError`` naming the file, which the CLI reports
    as its one-line disk-full error; unbuffered files mean nothing is left to fail again when they are closed.
    """

    def __init__(self, out: Path, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self._events = None
        self._file = None
        if enabled:
            path = out / "metrics.jsonl"
            kept = []
            if start > 0 and path.exists():
                kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            tmp = path.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            self._events = self._open_events(out / "tensorboard", start)
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def _open_events(self, logdir: Path, start: int):
        """A new TensorBoard event file (the name TensorBoard looks for; one per attempt, in time order). A
        resume starts it with a SessionLog START at ``start + 1``, which makes TensorBoard drop the earlier
        attempt's events from that step on (what SummaryWriter's ``purge_step`` writes)."""
        import socket

        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        events = open(  # noqa: SIM115 - closed in close()
            logdir / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}",
            "xb", buffering=0)
        first = [Event(wall_time=now, file_version="brain.Event:2")]
        if start > 0:
            first.append(Event(wall_time=now, step=start + 1, session_log=SessionLog(status=SessionLog.START)))
        self._append(events, self._records(first))
        return events

    @staticmethod
    def _records(events) -> bytes:
        """``events`` framed as TensorBoard's record file format (length, CRCs: its own RecordWriter)."""
        import io

        from tensorboard.summary.writer.record_writer import RecordWriter

        buffer = io.BytesIO()
        for event in events:
            RecordWriter(buffer).write(event.SerializeToString())
        return buffer.getvalue()

    @staticmethod
    def _append(file, data: bytes) -> None:
        # An unbuffered write may stop short (the disk fills mid-row): the rest is written or the error raised.
        view = memoryview(data)
        try:
            while view:
                view = view[file.write(view):]
        except OSError as err:
            if err.filename is None:  # write() errors name no file; the CLI's message needs it
                raise OSError(err.errno, err.strerror, file.name) from err
            raise

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        now = time.time()
        row = {"step": step, "time": round(now, 3)}
        scalars = []
        for key, value in metrics.items():
            name = f"{prefix}/{key}"
            row[name] = value
            if isinstance(value, (int, float)) and math.isfinite(value):
                scalars.append(Summary.Value(tag=name, simple_value=float(value)))
        if scalars:
            self._append(self._events, self._records([Event(wall_time=now, step=step,
                                                            summary=Summary(value=scalars))]))
        self._append(self._file, (json.dumps(row) + "\n").encode())

    def close(self) -> None:
        for file in (self._events, self._file):
            if file is not None:
                file.close()


def logged_rows(out: Path, upto: int, prefix: str = "train") -> list[dict]:
    """The ``prefix`` rows of ``out/metrics.jsonl`` logged at steps 1..``upto``, without the prefix: what a
    resumed run did before it stopped, so its final summary covers the whole run (rank 0 keeps the log)."""
    path, rows = out / "metrics.jsonl", []
    if upto < 1 or not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        row = json.loads(line) if line else {}
        if 1 <= row.get("step", 0) <= upto and any(k.startswith(f"{prefix}/") for k in row):
            rows.append({k.removeprefix(f"{prefix}/"): v for k, v in row.items() if k.startswith(f"{prefix}/")})
    return rows


@dataclasses.dataclass
class BatchPlan:
    """How records are cut into optimizer steps: global batch = micro x accumulation x processes."""

    num_records: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    def check(self, what: str) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{what}: {self.num_records} training records are fewer than one global batch of "
                f"{self.global_batch} (engine.micro_batch_size={self.micro_batch_size} x "
                f"engine.gradient_accumulation_steps={self.grad_accum} x {self.world_size} processes); "
                f"lower those or add data."
            )

    def epoch_order(self, epoch: int) -> list[int]:
        """A seeded permutation per epoch: the same on every rank and on every resume."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_records).tolist()

    def batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        """Record indices of one optimizer step's global batch; a pure function of (seed, epoch, step),
        which is all a resume needs. The incomplete tail of an epoch is dropped."""
        order = self.epoch_order(epoch)
        return order[step_in_epoch * self.global_batch : (step_in_epoch + 1) * self.global_batch]

    def step_micro_batches(self, global_idx: list[int], rank: int, items: list[dict], max_tokens: int = 0,
                           packed: bool = False) -> list[list[int]]:
        """This rank's micro-batches of the global batch ``global_idx`` (indices into ``items``): rows dealt to
        processes by length, sorted, cut into ``micro_batch_size`` rows or by the token budget ``max_tokens``;
        the same count on every process (``chatrlhf.data.micro_batches``). Pass the count to
        ``Engine.begin_step``."""
        from chatrlhf.data.micro_batches import row_size, step_micro_batches

        sizes = [row_size(items[i]) for i in global_idx]
        micro = step_micro_batches(sizes, self.world_size, rank, self.micro_batch_size, max_tokens, packed)
        return [[global_idx[p] for p in group] for group in micro]

    def local_micro_batches(self, global_idx: list[int], rank: int) -> list[list[int]]:
        """This rank's share of a global batch, cut into ``grad_accum`` micro-batches."""
        per_rank = self.micro_batch_size * self.grad_accum
        mine = global_idx[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]


def micro_batches_of_step(engine, plan: BatchPlan, step: int, items: list[dict]) -> list[list[int]]:
    """This process's micro-batches (indices into ``items``) of optimizer step ``step``, cut as the engine's
    ``packing`` and ``max_tokens_per_micro_batch`` say, with their count declared to the engine."""
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    micro = plan.step_micro_batches(plan.batch(epoch, in_epoch), engine.rank, items,
                                    engine.cfg.max_tokens_per_micro_batch, engine.cfg.packing)
    engine.begin_step(len(micro))
    return micro


def rank_batches(n: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's share of items ``0..n-1`` (every ``world``-th, from ``rank``) in batches, as (indices, real
    count). Every rank gets the same number of batches, the last padded by repeating an index, because under
    ZeRO-3 each forward is a collective that all ranks must join. Example: n 5, world 2, batch 2 -> rank 0:
    ([0, 2], 2), ([4], 1); rank 1: ([1, 3], 2), ([3], 0).
    """
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    return [(padded[i : i + batch_size], max(0, min(batch_size, len(mine) - i))) for i in range(0, per_rank, batch_size)]


def total_steps(plan: BatchPlan, epochs: int, max_steps: int) -> int:
    """Exactly ``max_steps`` when set (cycling through epochs as needed), else whole epochs."""
    return max_steps if max_steps > 0 else plan.steps_per_epoch * epochs
