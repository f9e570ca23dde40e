"""Small helpers shared by the benchmarks in bench/: what machine ran them, step-time statistics, tables.

Nothing here imports torch or the libraries it describes: versions are read from package metadata, so
a parent process that only orchestrates workers stays light.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

LIBRARIES = ("torch", "transformers", "deepspeed", "trl", "accelerate")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def load_average() -> str:
    """1/5/15-minute load averages: a benchmark on a busy machine says so in its header."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_description(threads: int | None = None) -> str:
    """One line naming the CPU, cores, thread setting, OS, Python and library versions, plus the date."""
    versions = " ".join(f"{k} {v}" for k, v in library_versions().items())
    thread_part = f", torch threads {threads}" if threads is not None else ""
    today = datetime.date.today().isoformat()
    return (
        f"{today} | {cpu_model()}, {usable_cores()} usable cores (os.cpu_count {os.cpu_count()}){thread_part} | "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()} | {versions}"
    )


@dataclass(frozen=True)
class StepStats:
    """Summary of per-step wall times in seconds."""

    n: int
    median: float
    mean: float
    minimum: float
    stdev: float

    @classmethod
    def of(cls, times: Sequence[float]) -> StepStats:
        if not times:
            raise ValueError("no step times to summarise (were all steps warm-up?)")
        stdev = statistics.stdev(times) if len(times) > 1 else 0.0
        return cls(len(times), statistics.median(times), statistics.fmean(times), min(times), stdev)


def paired_speedup(reference: Sequence[float], times: Sequence[float]) -> float:
    """Median over i of ``reference[i] / times[i]``: how many times faster ``times`` is than ``reference``.

    Pairs are steps taken close together (e.g. in the same turn-taking round), so a slow drift of the
    machine cancels inside each pair; the ratio of two medians has no such protection.
    ``paired_speedup([2, 4, 9], [1, 2, 9]) == 2.0``.
    """
    if len(reference) != len(times) or not times:
        raise ValueError(f"need two equally long, non-empty lists, got {len(reference)} and {len(times)}")
    return statistics.median(r / t for r, t in zip(reference, times))


def step_durations(timestamps: Sequence[float]) -> list[float]:
    """Durations between consecutive timestamps: ``[t0, t1, t2] -> [t1 - t0, t2 - t1]``."""
    return [b - a for a, b in zip(timestamps, timestamps[1:])]


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` holds the elapsed seconds (``perf_counter``)."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table with columns padded to line up in a terminal too.

    The first column is left-aligned (names), the others right-aligned (numbers).
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        [":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    ) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
