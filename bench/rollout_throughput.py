"""Rollout throughput on the embedded default model: every generation engine, in fp32 and bf16, in one run.

All rows generate from SmolLM2-135M-Instruct (eval mode) with the SAME prompts, seed and settings:
sampling at temperature 1.0, top_p 1.0, no top-k, natural EOS stopping (``<|im_end|>``), at most
--max-new-tokens tokens. Prompts are the demo training prompts (src/chatrlhf/demo_data/prompts_train.jsonl,
shuffled with --seed) through the chat template, left-padded by chatrlhf.data.PromptCollator.

    hf       chatrlhf.rollout.generate(backend="hf"): transformers' model.generate + a log-prob hook
    native   chatrlhf.rollout.generate(backend="native"): KV-cache decoding loop, finished rows dropped
    vllm     chatrlhf.rollout.vllm_engine.VLLMEngine (in-process vLLM), when vllm is installed; else its
             rows are skipped with the reason printed
    fp32     the checkpoint's float32 weights
    bf16     the same weights cast with model.to(torch.bfloat16) (vLLM: dtype="bfloat16"); sampling and
             log-probs still in float32 on the logits

Every row returns a Rollout with per-token log-probs. For each batch size, --repeats rounds; each round
takes the next batch of prompts and runs every row on it back to back, starting one row further along each
round, so a drifting machine slows all rows alike. Reported:

    tokens/s    generated response tokens (EOS included, padding excluded) / wall time of generate
    x HF fp32   median over rounds of (row tokens/s) / (hf fp32 tokens/s) in the same round
    MFU         2 * N_params * (real prompt tokens + response tokens) / time / peak, where peak is the
                best rate of a 2048^3 matmul in the row's dtype measured in the same run (same threads).
                N_params counts the tied embedding once; padding and rows kept alive after their EOS are
                work done but not counted as useful.
    work/useful tokens run through forward (rows x input length, all calls, padding included)
                / (real prompt tokens + response tokens); 1.0 = no wasted forward work (not measured for vLLM)

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rollout_throughput.py [--engines hf,native,vllm --dtypes fp32,bf16
        --batch-sizes 8,64 --max-new-tokens 96 --repeats 2 --threads <usable cores> --seed 0 --json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from common import bf16_description, load_average, machine_description, markdown_table, usable_cores

MODEL = "smollm2-135m-instruct"
PROMPTS = Path(__file__).resolve().parents[1] / "src" / "chatrlhf" / "demo_data" / "prompts_train.jsonl"
ENGINES = ("hf", "native", "vllm")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BASELINE = "hf fp32"


def peak_gflops(torch, dtype, size: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best GEMM rate (GFLOP/s) over ``reps`` timed ``size``^3 matmuls in ``dtype``, after one warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        if i:  # the first product is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def load_prompts(tokenizer, seed: int) -> list[list[int]]:
    from chatrlhf.data import encode_prompt

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], 512, "truncate_left")
            for r in rows]


class ForwardWork:
    """Forward hook summing rows x input length over every model call (padding and dummies included)."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.tokens += ids.shape[0] * ids.shape[1]


class ModuleRow:
    """An ``hf`` or ``native`` row: ``chatrlhf.rollout.generate`` on one module, counting forward work."""

    def __init__(self, backend: str, model):
        self.backend, self.model = backend, model

    def __call__(self, torch, batch, sampling, eos: int, seed: int):
        from chatrlhf.rollout import generate

        work = ForwardWork()
        handle = self.model.register_forward_hook(work, with_kwargs=True)
        try:
            r = generate(self.model, batch["input_ids"], batch["attention_mask"], sampling, eos_token_ids=[eos],
                         pad_token_id=eos, backend=self.backend,
                         generator=torch.Generator(batch["input_ids"].device).manual_seed(seed))
        finally:
            handle.remove()
        return r, work.tokens

    def close(self) -> None:
        pass


class VLLMRow:
    """A ``vllm`` row: one in-process engine of one dtype, built before the timed rounds."""

    def __init__(self, model_dir, dtype: str, max_model_len: int, seed: int):
        from chatrlhf.rollout.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed)

    def __call__(self, torch, batch, sampling, eos: int, seed: int):
        r = self.engine.generate(batch["input_ids"], batch["attention_mask"], sampling, eos_token_ids=[eos],
                                 pad_token_id=eos, generator=torch.Generator().manual_seed(seed))
        return r, None

    def close(self) -> None:
        self.engine.close()


def vllm_unavailable() -> str | None:
    """Why vLLM rows cannot run here, or None when they can."""
    import importlib.util

    if importlib.util.find_spec("chatrlhf.rollout.vllm_engine") is None:
        return "chatrlhf.rollout.vllm_engine is not in this checkout"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (bash scripts/install.sh --vllm)"
    return None


def build_rows(torch, args, model, max_model_len: int) -> tuple[dict, list[str]]:
    """The rows asked for by ``--engines`` x ``--dtypes`` -> (name -> row, skipped-row notes)."""
    from chatrlhf.models.loading import resolve_model

    rows, skipped = {}, []
    models = {"fp32": model}
    if "bf16" in args.dtypes and {"hf", "native"} & set(args.engines):
        models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    for engine in args.engines:
        for dtype in args.dtypes:
            name = f"{engine} {dtype}"
            if engine != "vllm":
                rows[name] = ModuleRow(engine, models[dtype])
                continue
            reason = vllm_unavailable()
            if reason:
                skipped.append(f"{name}: skipped, {reason}")
                continue
            t0 = time.perf_counter()
            rows[name] = VLLMRow(resolve_model(MODEL), DTYPES[dtype], max_model_len, args.seed)
            print(f"{name}: engine started in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows, skipped


def run_once(torch, row, batch, sampling, eos: int, seed: int) -> dict:
    start = time.perf_counter()
    r, forward_tokens = row(torch, batch, sampling, eos, seed)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "response_tokens": int(r.response_mask.sum()),
            "prompt_tokens": int(batch["attention_mask"].sum()), "forward_tokens": forward_tokens,
            "finished": int(r.finished.sum()), "rows": len(r), "mean_length": float(r.response_lengths.float().mean())}


def timed_rounds(torch, args, rows: dict, prompts, collate, eos: int) -> dict:
    """batch size -> row name -> one result per round; every row of a round sees the same batch."""
    from chatrlhf.rollout import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    warm = collate([{"input_ids": p} for p in prompts[:2]])
    for row in rows.values():  # untimed warm-up: first-call allocations, lazy imports
        row(torch, warm, SamplingConfig(max_new_tokens=4), eos, args.seed)
    names, results, offset = list(rows), {}, 0
    for batch_size in args.batch_sizes:
        for k in range(args.repeats):
            batch = collate([{"input_ids": prompts[(offset + i) % len(prompts)]} for i in range(batch_size)])
            offset += batch_size
            for name in names[k % len(names):] + names[:k % len(names)]:
                res = run_once(torch, rows[name], batch, sampling, eos, args.seed)
                results.setdefault(batch_size, {}).setdefault(name, []).append(res)
                print(f"batch {batch_size} round {k + 1}/{args.repeats} {name}: {res['seconds']:.1f} s, "
                      f"{res['response_tokens']} tokens", file=sys.stderr, flush=True)
    return results


def measure(args) -> tuple[dict, dict, float, list[str]]:
    """(results, peak GFLOP/s by dtype, N_params, skipped-row notes)."""
    import torch

    from chatrlhf.data import PromptCollator
    from chatrlhf.models import count_parameters, load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL, padding_side="left")
    model = load_causal_lm(MODEL, dtype="float32").eval()
    eos = int(tokenizer.eos_token_id)
    prompts = load_prompts(tokenizer, args.seed)
    rows, skipped = build_rows(torch, args, model, max(map(len, prompts)) + args.max_new_tokens)
    peaks = {d: peak_gflops(torch, getattr(torch, DTYPES[d])) for d in args.dtypes}
    try:
        results = timed_rounds(torch, args, rows, prompts, PromptCollator(tokenizer.pad_token_id), eos)
    finally:
        for row in rows.values():
            row.close()
    torch.set_num_threads(args.threads)
    # The better of start and end: the machine may have been busy once.
    peaks = {d: max(p, peak_gflops(torch, getattr(torch, DTYPES[d]))) for d, p in peaks.items()}
    return results, peaks, float(count_parameters(model)), skipped


def rate(run: dict) -> float:
    return run["response_tokens"] / run["seconds"]


def table_rows(results: dict, peaks: dict, n_params: float) -> list[list[str]]:
    out = []
    for batch_size, by_row in results.items():
        base = by_row.get(BASELINE)
        for name, runs in by_row.items():
            seconds = sum(r["seconds"] for r in runs)
            response = sum(r["response_tokens"] for r in runs)
            useful = sum(r["prompt_tokens"] + r["response_tokens"] for r in runs)
            ratio = f"{statistics.median(rate(r) / rate(b) for r, b in zip(runs, base)):.2f}" if base else "n/a"
            mfu = 2 * n_params * useful / seconds / (peaks[name.split()[1]] * 1e9)
            work = ("n/a" if runs[0]["forward_tokens"] is None
                    else f"{sum(r['forward_tokens'] for r in runs) / useful:.2f}")
            finished = sum(r["finished"] for r in runs) / sum(r["rows"] for r in runs)
            out.append([f"{batch_size}", *name.split(), f"{len(runs)}", f"{response}", f"{seconds:.1f}",
                        f"{response / seconds:.1f}", ratio, f"{100 * mfu:.1f}%", work,
                        f"{statistics.fmean(r['mean_length'] for r in runs):.0f}", f"{100 * finished:.0f}%"])
    return out


def report(results: dict, peaks: dict, n_params: float, skipped: list[str], args) -> str:
    headers = ["batch", "engine", "dtype", "rounds", "response tokens", "time (s)", "tokens/s", "x HF fp32",
               "MFU", "work/useful", "mean length", "ended by EOS"]
    peak_text = ", ".join(f"{d} {p:.1f}" for d, p in peaks.items())
    return "\n".join([
        f"machine: {machine_description(args.threads)}",
        bf16_description(),
        f"model {MODEL}, eval | sampling T=1.0 top_p=1.0, natural EOS, max_new_tokens {args.max_new_tokens} | "
        f"{args.repeats} rounds per batch size, rows rotating | peak GEMM GFLOP/s {peak_text} | "
        f"N_params {n_params / 1e6:.1f}M | load avg at end {load_average()}",
        *skipped,
        "",
        markdown_table(headers, table_rows(results, peaks, n_params)),
        "",
        "tokens/s: response tokens / generate wall time, summed over rounds. x HF fp32: median over rounds of "
        "the row's tokens/s over hf fp32's in the same round. MFU = 2 N (prompt + response tokens) / time / "
        "peak GEMM rate of the row's dtype.",
    ])


def _choices(p, text: str, allowed, flag: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        p.error(f"{flag} takes a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return chosen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of hf,native,vllm")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,bf16")
    p.add_argument("--batch-sizes", default="8,64", help="comma-separated prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2, help="rounds per batch size, each on new prompts")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="prompt shuffle and sampling seed")
    p.add_argument("--json", type=Path, help="also write the raw per-run numbers here")
    args = p.parse_args(argv)
    args.engines = _choices(p, args.engines, ENGINES, "--engines")
    args.dtypes = _choices(p, args.dtypes, tuple(DTYPES), "--dtypes")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    for name in ("max_new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # read by vLLM's CPU worker
    t0 = time.perf_counter()
    results, peaks, n_params, skipped = measure(args)
    print(f"finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = report(results, peaks, n_params, skipped, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"report": text, "peak_gflops": peaks, "n_params": n_params,
                                         "skipped": skipped, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
