"""Generation throughput on one GPU: chatrlhf's native engine vs transformers' generate, in bf16.

The embedded default model (SmolLM2-135M-Instruct) comes in a 93 MB wheel, more than the 64 MiB the GPU
check may carry, so this times a randomly initialised Llama with SmolLM2-135M's shape instead (hidden 576,
30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings; 134.5M parameters): the same
matmuls, KV cache and sampling work per token. What a random model cannot give is natural answer lengths,
so EOS is disabled (an id outside the vocabulary) and every row generates exactly --max-new-tokens tokens;
prompts are random token ids of --prompt-lengths (uniform, left-padded). Rows, on the same prompts, seed and
sampling (T = 1, no top-k/top-p), all through ``chatrlhf.rollout.generate``:

    hf                  backend="hf": model.generate + the log-prob hook
    native              backend="native" with the decode policy of this device (on CUDA: a look at ended
                        rows every 8 steps, host-decided attention masks; no host sync per step)
    native every-step   backend="native" with the CPU policy forced (a look after every step and
                        transformers' own mask check: the loop as it was before the policy existed)

Each round runs every row once on a new batch (rows rotating); tokens/s = generated tokens / wall time of
generate (torch.cuda.synchronize() before and after), median over rounds; x hf = median over rounds of the
ratio to hf in the same round.

    python bench/gpu_throughput.py [--batch-sizes 64,256 --max-new-tokens 128 --repeats 3 --dtype bf16]
    python bench/gpu_throughput.py --device cpu --layers 2 --batch-sizes 2 --max-new-tokens 4   (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import library_versions, markdown_table

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
ROWS = ("hf", "native", "native every-step")


def build_model(torch, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(args.seed)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()


def make_prompts(torch, args, batch: int, seed: int):
    """(B, P) random ids in [3, vocab), lengths uniform in --prompt-lengths, left-padded with 2."""
    from chatrlhf.data.collate import pad_sequences

    g = torch.Generator().manual_seed(seed)
    low, high = args.prompt_lengths
    lengths = torch.randint(low, high + 1, (batch,), generator=g).tolist()
    rows = [torch.randint(3, SMOLLM2_135M["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_sequences(rows, 2, side="left")
    return ids.to(args.device), mask.to(args.device)


def run_row(torch, model, row: str, ids, mask, args, seed: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one generate call."""
    import chatrlhf.rollout.sampler as sampler
    from chatrlhf.rollout import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    policy = sampler.decode_policy
    if row == "native every-step":
        sampler.decode_policy = lambda device: sampler.CPU_POLICY
    try:
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        r = generate(model, ids, mask, sampling, eos_token_ids=[model.config.vocab_size], pad_token_id=2,
                     backend="hf" if row == "hf" else "native",
                     generator=torch.Generator(args.device).manual_seed(seed))
        sync()
        return time.perf_counter() - start, int(r.response_mask.sum())
    finally:
        sampler.decode_policy = policy


def measure(torch, model, args) -> dict:
    """batch size -> row -> [(seconds, tokens)] per round."""
    warm_ids, warm_mask = make_prompts(torch, args, 2, seed=12345)
    for row in ROWS:  # untimed: kernels' first launch, allocator growth
        run_row(torch, model, row, warm_ids, warm_mask, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}), 0)
    results: dict = {}
    start = time.perf_counter()
    for batch in args.batch_sizes:
        for k in range(args.repeats):
            if k and time.perf_counter() - start > args.budget_s:
                print(f"batch {batch}: time budget {args.budget_s:.0f} s spent, {k} rounds", file=sys.stderr)
                break
            ids, mask = make_prompts(torch, args, batch, seed=1000 * batch + k)
            for row in ROWS[k % len(ROWS):] + ROWS[:k % len(ROWS)]:
                seconds, tokens = run_row(torch, model, row, ids, mask, args, seed=k)
                results.setdefault(batch, {}).setdefault(row, []).append((seconds, tokens))
                print(f"batch {batch} round {k + 1}/{args.repeats} {row}: {seconds:.2f} s, {tokens} tokens",
                      file=sys.stderr, flush=True)
    return results


def report(results: dict, args) -> str:
    rows = []
    for batch, by_row in results.items():
        hf = [t / s for s, t in by_row["hf"]]
        for row, runs in by_row.items():
            rates = [t / s for s, t in runs]
            ratio = statistics.median(r / h for r, h in zip(rates, hf))
            step_ms = statistics.median(s for s, _ in runs) / args.max_new_tokens * 1e3
            rows.append([f"{batch}", row, f"{len(runs)}", f"{statistics.median(rates):.0f}", f"{ratio:.2f}",
                         f"{step_ms:.1f}"])
    headers = ["batch", "row", "rounds", "tokens/s", "x hf", "ms per token step"]
    return markdown_table(headers, rows)


def describe(torch, model, args) -> str:
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    versions = " ".join(f"{k} {v}" for k, v in library_versions(("torch", "transformers")).items())
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"{name} | {versions} | random Llama, SmolLM2-135M shape ({args.layers} layers, {n:.1f}M params), "
            f"{args.dtype} | prompts {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens, "
            f"{args.max_new_tokens} new tokens, EOS disabled, T=1 | {args.repeats} rounds, rows rotating")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-lengths", default="32,128", help="lowest,highest prompt length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="fewer for a smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="start no further round (beyond each batch size's first) after this many seconds")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        args.prompt_lengths = tuple(int(n) for n in args.prompt_lengths.split(","))
    except ValueError:
        p.error("--batch-sizes and --prompt-lengths take comma-separated integers")
    if len(args.prompt_lengths) != 2 or not 1 <= args.prompt_lengths[0] <= args.prompt_lengths[1]:
        p.error(f"--prompt-lengths must be low,high with 1 <= low <= high, got {args.prompt_lengths}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to time (--device cpu runs a smoke test)")
        return 0
    t0 = time.perf_counter()
    model = build_model(torch, args)
    results = measure(torch, model, args)
    print(describe(torch, model, args))
    print()
    print(report(results, args))
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
