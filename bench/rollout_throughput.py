"""Rollout throughput on the embedded default model: chatrlhf's native sampler vs transformers' generate.

Both backends go through ``chatrlhf.rollout.generate`` (so both return a Rollout with per-token
log-probs) on SmolLM2-135M-Instruct (fp32, eval mode), with the SAME prompts, seed and settings:
sampling at temperature 1.0, top_p 1.0, no top-k, natural EOS stopping (``<|im_end|>``), at most
--max-new-tokens tokens. Prompts are the demo training prompts (src/chatrlhf/demo_data/prompts_train.jsonl,
shuffled with --seed) through the chat template, left-padded by chatrlhf.data.PromptCollator.

    native   chatrlhf.rollout.generate(backend="native"): KV-cache decoding loop, finished rows dropped
    hf       chatrlhf.rollout.generate(backend="hf"): transformers' model.generate + a log-prob hook

For each batch size, --repeats rounds; each round takes the next batch of prompts and runs both backends
back to back on it, alternating which goes first, so a drifting machine slows both alike. Reported:

    tokens/s    generated response tokens (EOS included, padding excluded) / wall time of generate
    x HF        median over rounds of (native tokens/s) / (hf tokens/s) in the same round
    MFU         2 * N_params * (real prompt tokens + response tokens) / time / peak, where peak is the
                best rate of a 2048 x 2048 x 2048 fp32 matmul measured in the same run (same threads).
                N_params counts the tied embedding once (it is the LM head's matmul); padding and rows
                kept alive after their EOS are work done but not counted as useful.
    work/useful tokens run through forward (rows x input length, all calls, padding included)
                / (real prompt tokens + response tokens): 1.0 = no wasted forward work

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rollout_throughput.py [--batch-sizes 8,32,64
        --max-new-tokens 128 --repeats 2 --threads <os.cpu_count()> --seed 0 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from common import load_average, machine_description, markdown_table

MODEL = "smollm2-135m-instruct"
PROMPTS = Path(__file__).resolve().parents[1] / "src" / "chatrlhf" / "demo_data" / "prompts_train.jsonl"
BACKENDS = ("native", "hf")


def peak_gflops(torch, size: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM rate (GFLOP/s) over ``reps`` timed ``size``^3 matmuls, after one warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
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


def run_once(torch, model, batch, backend: str, args, eos: int) -> dict:
    from chatrlhf.rollout import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    work = ForwardWork()
    handle = model.register_forward_hook(work, with_kwargs=True)
    try:
        start = time.perf_counter()
        r = generate(model, batch["input_ids"], batch["attention_mask"], sampling, eos_token_ids=[eos],
                     pad_token_id=eos, backend=backend, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    response = int(r.response_mask.sum())
    return {"seconds": seconds, "response_tokens": response, "prompt_tokens": int(batch["attention_mask"].sum()),
            "forward_tokens": work.tokens, "finished": int(r.finished.sum()), "rows": len(r),
            "mean_length": float(r.response_lengths.float().mean())}


def measure(args) -> tuple[dict, float, float]:
    import torch

    from chatrlhf.data import PromptCollator
    from chatrlhf.models import count_parameters, load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL, padding_side="left")
    model = load_causal_lm(MODEL, dtype="float32").eval()
    eos = int(tokenizer.eos_token_id)
    prompts = load_prompts(tokenizer, args.seed)
    collate = PromptCollator(tokenizer.pad_token_id)
    peak = peak_gflops(torch)
    for backend in BACKENDS:  # untimed warm-up: first-call allocations, lazy imports
        warm = collate([{"input_ids": p} for p in prompts[:2]])
        generate_args = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
        run_once(torch, model, warm, backend, generate_args, eos)
    results: dict = {}
    offset = 0
    for batch_size in args.batch_sizes:
        for k in range(args.repeats):
            rows = [prompts[(offset + i) % len(prompts)] for i in range(batch_size)]
            offset += batch_size
            batch = collate([{"input_ids": p} for p in rows])
            order = BACKENDS if k % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                res = run_once(torch, model, batch, backend, args, eos)
                results.setdefault(batch_size, {}).setdefault(backend, []).append(res)
                print(f"batch {batch_size} round {k + 1}/{args.repeats} {backend}: {res['seconds']:.1f} s, "
                      f"{res['response_tokens']} tokens", file=sys.stderr, flush=True)
    peak = max(peak, peak_gflops(torch))  # the better of start and end: the machine may have been busy once
    return results, peak, float(count_parameters(model))


def report(results: dict, peak: float, n_params: float, args) -> str:
    rows = []
    for batch_size, by_backend in results.items():
        native_rates = [r["response_tokens"] / r["seconds"] for r in by_backend["native"]]
        hf_rates = [r["response_tokens"] / r["seconds"] for r in by_backend["hf"]]
        for backend, runs in by_backend.items():
            seconds = sum(r["seconds"] for r in runs)
            response = sum(r["response_tokens"] for r in runs)
            useful = sum(r["prompt_tokens"] + r["response_tokens"] for r in runs)
            ratio = statistics.median(n / h for n, h in zip(native_rates, hf_rates)) if backend == "native" else 1.0
            mfu = 2 * n_params * useful / seconds / (peak * 1e9)
            finished = sum(r["finished"] for r in runs) / sum(r["rows"] for r in runs)
            mean_len = statistics.fmean(r["mean_length"] for r in runs)
            rows.append([f"{batch_size}", backend, f"{len(runs)}", f"{response}", f"{seconds:.1f}",
                         f"{response / seconds:.1f}", f"{ratio:.2f}", f"{100 * mfu:.1f}%",
                         f"{sum(r['forward_tokens'] for r in runs) / useful:.2f}", f"{mean_len:.0f}",
                         f"{100 * finished:.0f}%"])
    headers = ["batch", "backend", "rounds", "response tokens", "time (s)", "tokens/s", "x HF", "MFU",
               "work/useful", "mean length", "ended by EOS"]
    return "\n".join([
        f"machine: {machine_description(args.threads)}",
        f"model {MODEL} fp32, eval | sampling T=1.0 top_p=1.0, natural EOS, max_new_tokens {args.max_new_tokens} | "
        f"{args.repeats} rounds per batch size, backends alternating | peak fp32 GEMM {peak:.1f} GFLOP/s | "
        f"N_params {n_params / 1e6:.1f}M | load avg at end {load_average()}",
        "",
        markdown_table(headers, rows),
        "",
        "tokens/s: response tokens / generate wall time, summed over rounds. x HF: median over rounds of the "
        "native/hf tokens/s ratio. MFU = 2 N (prompt + response tokens) / time / peak GEMM rate.",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="8,32,64", help="comma-separated prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="rounds per batch size, each on new prompts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="prompt shuffle and sampling seed")
    p.add_argument("--json", type=Path, help="also write the raw per-run numbers here")
    args = p.parse_args(argv)
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
    t0 = time.perf_counter()
    results, peak, n_params = measure(args)
    print(f"finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = report(results, peak, n_params, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"report": text, "peak_gflops": peak, "n_params": n_params,
                                         "results": results, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
