"""Scaling out SFT: step time and memory per process for 1 process and 2 processes under ZeRO 0, 2, 3 and offload.

Each configuration is a real ``chatrlhf sft`` run of SmolLM2-135M-Instruct (fp32 on CPU; ``--dtype`` for
GPUs) started by DeepSpeed's launcher, one after another, on the same data with the same global batch:

    1p zero0              1 process,  micro-batch B,   ZeRO 0 (plain data parallel, nothing to partition)
    2p zero0              2 processes, micro-batch B/2, ZeRO 0 (weights, gradients, AdamW state replicated)
    2p zero2              2 processes, ZeRO 2 (AdamW state and gradients partitioned)
    2p zero3              2 processes, ZeRO 3 (weights partitioned too)
    2p zero3 + offload    2 processes, ZeRO 3, optimizer state and weights offloaded to CPU memory
                          (--engine.offload_optimizer true --engine.offload_params true)

Every launched process is this script in worker mode: it runs ``chatrlhf.cli.main(["sft", ...])`` (the
command a user runs, unchanged) and records its memory at the end of each optimizer step through a wrapper
around ``Engine.step``: the peak resident set size so far (``getrusage(RUSAGE_SELF).ru_maxrss``: model
loading and the first steps included), the resident set size at the last step (``VmRSS``: the steady
state) and, on a GPU, ``torch.cuda.max_memory_allocated``. Step times come from the stage's own
``metrics.jsonl`` (rank 0 writes a row with a wall-clock ``time`` after every optimizer step, after the
loss is summed over processes): the gaps between consecutive rows, the first --warmup steps dropped. Model
loading, the final evaluation (two short records) and the model save fall outside.

Processes share the cores: each of N processes on a node gets ``OMP_NUM_THREADS = cores // N`` (1 process:
all cores), so every row uses the whole machine. All rows train on the same batches in the same order
(same global batch and seed), so their losses agree to float summation order: the ``mean loss`` column.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py [--model smollm2-135m-instruct --steps 5 --warmup 2 --batch-size 4 --max-len 128
        --dtype float32 --configs 1p-zero0,2p-zero0,2p-zero2,2p-zero3,2p-zero3-offload --timeout 600
        --json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    OFFLINE_ENV,
    StepStats,
    load_average,
    machine_description,
    markdown_table,
    step_durations,
    usable_cores,
)

OFFLOAD_FLAGS = ("offload_optimizer", "offload_params")


@dataclasses.dataclass(frozen=True)
class Setup:
    processes: int
    zero_stage: int
    offload: bool = False

    def flags(self) -> list[str]:
        out = ["--engine.zero_stage", str(self.zero_stage)]
        for flag in OFFLOAD_FLAGS if self.offload else ():
            out += [f"--engine.{flag}", "true"]
        return out


CONFIGS = {
    "1p-zero0": Setup(1, 0),
    "2p-zero0": Setup(2, 0),
    "2p-zero2": Setup(2, 2),
    "2p-zero3": Setup(2, 3),
    "2p-zero3-offload": Setup(2, 3, offload=True),
}
BASELINE = "1p-zero0"


# ---- data ------------------------------------------------------------------------------------------------
def prepare_data(args, workdir: Path) -> dict:
    """``records.jsonl``: global batch x (warmup + steps) chat records, each longer than --max-len tokens (cut
    to it, so every micro-batch is (micro, max_len) with no padding); ``eval.jsonl``: two short records for
    the stage's final evaluation (untimed)."""
    from sft_throughput import synthetic_records

    from chatrlhf.models.loading import load_tokenizer

    n = args.batch_size * (args.warmup + args.steps)
    records = synthetic_records(load_tokenizer(args.model), n, args.max_len, args.seed)
    # The final evaluation is not timed: two short exchanges keep it cheap and fit any --max-len. Two, so that
    # each of 2 processes evaluates one: under ZeRO-3 every forward is collective (layers are gathered), and a
    # process with nothing to evaluate would leave the other waiting in its forward.
    short = [{"messages": [{"role": "user", "content": f"How do I start {what}?"},
                           {"role": "assistant", "content": "Start small, with a few easy steps."}]}
             for what in ("a garden", "a budget")]
    for name, rows in (("records", records), ("eval", short)):
        with open(workdir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"records": n}


def sft_argv(args, workdir: Path, name: str) -> list[str]:
    setup = CONFIGS[name]
    return [
        "sft", "--model.name_or_path", args.model, "--model.dtype", args.dtype,
        "--data.datasets", f"[{workdir / 'records.jsonl'}]", "--data.eval_datasets", f"[{workdir / 'eval.jsonl'}]",
        "--data.data_split", "1,0,0", "--data.max_len", str(args.max_len),
        "--data.max_prompt_len", str(args.max_len // 2),
        "--engine.micro_batch_size", str(args.batch_size // setup.processes),
        "--engine.gradient_accumulation_steps", "1", "--engine.learning_rate", str(args.lr),
        "--engine.lr_scheduler", "constant", "--engine.warmup_steps", "0", "--engine.seed", str(args.seed),
        *setup.flags(),
        "--run.output_dir", str(workdir / f"out-{name}"), "--run.overwrite", "true", "--run.eval_at_start", "false",
        "--run.progress", "false", "--max_steps", str(args.warmup + args.steps),
    ]  # fmt: skip


# ---- worker: one launched process ------------------------------------------------------------------------
def _vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(name: str, workdir: Path) -> None:
    import torch

    from chatrlhf.cli import main as chatrlhf_main
    from chatrlhf.engine import Engine

    args = argparse.Namespace(**json.loads((workdir / "args.json").read_text()))
    memory: dict[str, float] = {}
    engine_step = Engine.step

    def step_and_measure(self):
        applied = engine_step(self)
        if applied:
            # ru_maxrss is in KiB on Linux: the high-water mark of this process up to this step.
            memory["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            memory["rss_mb"] = _vm_rss_mb()
            if torch.cuda.is_available():
                memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return applied

    Engine.step = step_and_measure
    status = chatrlhf_main(sft_argv(args, workdir, name))
    rank = int(os.environ.get("RANK", "0"))
    result = {"status": status, "rank": rank, "threads": torch.get_num_threads(), **memory}
    (workdir / f"result-{name}-rank{rank}.json").write_text(json.dumps(result))
    if status:
        raise SystemExit(status)


# ---- parent: one launcher run per configuration --------------------------------------------------------
def launch(args, workdir: Path, name: str, port: int) -> dict:
    """Runs ``name`` under ``deepspeed --num_gpus N`` and returns its step times, losses and per-rank memory."""
    setup = CONFIGS[name]
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise SystemExit("the deepspeed launcher is not installed beside this Python or on PATH")
    threads = max(1, args.cores // setup.processes) if args.device == "cpu" else 1
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [launcher, "--num_gpus", str(setup.processes), "--master_port", str(port), "--no_local_rank",
           __file__, "--worker", name, "--workdir", str(workdir)]
    log = workdir / f"log-{name}.txt"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # A session of its own, so that a run that hangs (a collective one process never joins) can be ended
        # with all its processes, and the next configuration still runs.
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = f"timed out after {args.timeout} s"
    wall = time.perf_counter() - t0
    if returncode:
        tail = log.read_text(errors="replace")[-3000:]
        print(f"{name}: failed ({returncode}); end of its log:\n{tail}", file=sys.stderr, flush=True)
        return {"error": str(returncode) if isinstance(returncode, str) else f"exit {returncode}", "wall_s": wall}
    rows = [json.loads(line) for line in (workdir / f"out-{name}" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    ranks = [json.loads((workdir / f"result-{name}-rank{r}.json").read_text()) for r in range(setup.processes)]
    print(f"{name}: done in {wall:.0f} s", file=sys.stderr, flush=True)
    return {"times": [r["time"] for r in train], "losses": [r["train/loss"] for r in train], "ranks": ranks,
            "threads": threads, "wall_s": wall}


def _memory(ranks: list[dict], key: str) -> str:
    values = [r[key] for r in ranks if key in r]
    if not values:
        return "-"
    return " / ".join(f"{v:,.0f}" for v in values)


def report(results: dict[str, dict], args) -> str:
    stats = {n: StepStats.of(step_durations(r["times"])[args.warmup - 1 :]) for n, r in results.items() if "times" in r}
    base = stats.get(BASELINE)
    rows = []
    for name, r in results.items():
        setup = CONFIGS[name]
        what = [name, str(setup.processes), str(setup.zero_stage), "yes" if setup.offload else "no"]
        if "error" in r:
            rows.append([*what, f"failed ({r['error']}; see its log)", "", "", "", "", "", ""])
            continue
        s = stats[name]
        ratio = f"{s.median / base.median:.2f}" if base else "-"
        losses = r["losses"][args.warmup :]
        rows.append([*what, f"{s.median:.2f}", f"{s.minimum:.2f}", ratio, _memory(r["ranks"], "peak_rss_mb"),
                     _memory(r["ranks"], "rss_mb"), _memory(r["ranks"], "cuda_peak_mb"),
                     f"{statistics.fmean(losses):.4f}"])
    headers = ["config", "processes", "ZeRO", "offload", "step median (s)", "step min (s)", "x 1p-zero0 time",
               "peak RSS per process (MB)", "RSS at last step (MB)", "GPU peak alloc (MB)", "mean loss"]
    setup_line = (f"model {args.model} {args.dtype} | global batch {args.batch_size} x {args.max_len} tokens (no padding), "
                  f"the same batches for every row | {args.steps} timed steps after {args.warmup} warm-up | "
                  f"threads per process: cores // processes | load avg at end {load_average()}")
    return "\n".join([
        f"machine: {machine_description()}",
        setup_line,
        "",
        markdown_table(headers, rows),
        "",
        "x 1p-zero0 time: median step time / that of 1 process at ZeRO 0 (> 1: slower). Memory columns list each "
        "process (rank 0 / rank 1). Peak RSS: high-water mark up to the last training step (model loading "
        "included); RSS at last step: resident memory then.",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama) or a local HF model dir")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (sequences per optimizer step); even")
    p.add_argument("--max-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lr", type=float, default=2e-5, help="constant learning rate")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--timeout", type=int, default=600, help="seconds before a configuration's run is killed")
    p.add_argument("--master-port", type=int, default=29640, help="first rendezvous port (one per configuration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the raw step times, losses and memory here")
    p.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % 2:
        p.error(f"--batch-size must be even (2 processes each take half), got {args.batch_size}")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {','.join(CONFIGS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.workdir)
        return
    os.environ.update(OFFLINE_ENV)
    import torch  # the parent only asks which device the workers will see

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.cores = usable_cores()
    chosen = [n for n in CONFIGS if n in args.configs.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        workdir = Path(tmp)
        (workdir / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}))
        data = prepare_data(args, workdir)
        for i, name in enumerate(chosen):
            results[name] = launch(args, workdir, name, args.master_port + i)
    text = report(results, args)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"report": text, "data": data, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
