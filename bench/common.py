"""Small helpers shared by the benchmarks in bench/: what machine ran them, step-time statistics, tables.

Nothing here imports torch or the libraries it describes: versions are read from package metadata, so
a parent process that only orchestrates workers stays light.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "deepspeed", "trl", "accelerate")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
"""Environment of every benchmark process: offline, no tokenizer threads, no progress bars."""
ADAM_BETAS = (0.9, 0.95)  # chatrlhf's (DeepSpeed-Chat's) betas; TRL's default beta2 is 0.999
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0


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


BF16_FLAGS = ("amx_bf16", "avx512_bf16", "amx_tile", "avx512f")
"""CPU flags that decide how fast bf16 runs: AMX tiles and their bf16 ops, AVX-512 and its bf16 dot products.
Without them torch emulates bf16 matmuls, slower than fp32."""


def lscpu_model() -> str:
    """``lscpu``'s "Model name" (the name the vendor gives the virtual CPU), else ``cpu_model()``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return cpu_model()


def bf16_description() -> str:
    """One line: the lscpu model name and which of ``BF16_FLAGS`` this CPU has, e.g.
    ``lscpu: Intel(R) Xeon(R) Processor | amx_bf16 yes, avx512_bf16 yes, amx_tile yes, avx512f yes``."""
    from chatrlhf.precision import cpu_flags

    flags = cpu_flags()
    found = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in BF16_FLAGS)
    return f"lscpu: {lscpu_model()} | {found}"


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


# ---- sequential comparisons: one fresh worker process per implementation ------------------------------
def run_sequentially(args, impls: Sequence[str], script: str, prepare, prefix: str) -> tuple[dict, dict]:
    """Parent side: writes ``args.json`` and the inputs (``prepare(args, workdir) -> data description``) to a
    temp dir, then runs each of ``impls`` (in ``args.impls``) one after another in its own interpreter.
    Returns (results by implementation, data description)."""
    os.environ.update(OFFLINE_ENV)
    chosen = [i for i in impls if i in args.impls.split(",")]
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (workdir / "args.json").write_text(json.dumps(saved))
        data = prepare(args, workdir)
        results = {}
        for impl in chosen:
            t0 = time.perf_counter()
            results[impl] = _run_worker(script, impl, workdir, args.threads)
            print(f"{impl}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return results, data


def _run_worker(script: str, impl: str, workdir: Path, threads: int) -> dict:
    """Runs ``script --worker impl`` in a fresh interpreter (no allocator, thread pool or patched class shared
    with another run) and returns its result; on failure, raises with the end of its log."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = workdir / f"log-{impl}.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, script, "--worker", impl, "--workdir", str(workdir)], env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{impl} worker failed (exit {proc.returncode}); end of {log.name}:\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    return json.loads((workdir / f"result-{impl}.json").read_text())


def worker_main(workers: dict, impl: str, workdir: Path) -> None:
    """Entry point of a worker process: runs ``workers[impl](args, workdir)``, writes ``result-<impl>.json``."""
    import torch

    args = argparse.Namespace(**json.loads((workdir / "args.json").read_text()))
    torch.set_num_threads(args.threads)
    result = workers[impl](args, workdir)
    # A library that changed the thread count would skew the comparison: report it.
    result["threads_after"] = torch.get_num_threads()
    (workdir / f"result-{impl}.json").write_text(json.dumps(result))


def publish(text: str, args, data: dict, results: dict) -> None:
    """Prints the report and, with ``--json``, writes it with the raw results."""
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"report": text, "data": data, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
