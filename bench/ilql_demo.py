"""ILQL demo on the default model: offline scores in, a better decoding policy out.

1. Offline data: the default model samples ``--samples`` answers (temperature 1) to each of the first
   ``--prompts`` demo training prompts; the simulated rater (``--reward rater``, the demo's gold judge, a
   stand-in for the app's human ratings) scores each answer (0-1). Written to ``OUT/ratings.jsonl``.
2. ``chatrlhf ilql`` on those rows, evaluated with the same rater on held-out demo prompts (``demo:prompts_eval``):
   greedy answers of the LM alone (beta 0) and of the ILQL policy (beta), before and after training.

Usage: python bench/ilql_demo.py --out /tmp/ilql_demo [--prompts 200 --samples 2 --steps 100]
Prints the machine, the data's score distribution and the evaluation table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")]
    return f"{fields.get('Model name', platform.processor()).strip()}, {torch.get_num_threads()} threads, {flags}"


def offline_rows(args) -> list[dict]:
    from chatrlhf.data import PromptCollator, encode_records, load_records
    from chatrlhf.evaluation.answers import eos_token_ids
    from chatrlhf.models import load_causal_lm, load_tokenizer
    from chatrlhf.rewards.contract import RewardBatch
    from chatrlhf.rewards.factory import build_reward_source
    from chatrlhf.rollout import SamplingConfig, decode_responses, generate

    records, _ = load_records("demo:prompts_train")
    prompts = [r["prompt"] for r in records[: args.prompts]] * args.samples
    tok, model = load_tokenizer(args.model), load_causal_lm(args.model).eval()
    rater, eos = build_reward_source("rater", tok), eos_token_ids(tok, model)
    generator, rows = torch.Generator().manual_seed(0), []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        batch = PromptCollator(tok.pad_token_id)(encode_records([{"prompt": p} for p in chunk], "prompt", tok,
                                                                progress=False))
        rollout = generate(model, batch["input_ids"], batch["attention_mask"], SamplingConfig(args.max_new_tokens),
                           eos_token_ids=eos, pad_token_id=tok.pad_token_id, generator=generator, max_batch=32)
        answers = decode_responses(tok, rollout)
        scores = rater(RewardBatch(rollout.sequences, rollout.attention_mask, chunk, answers, rollout.finished.tolist(),
                                   [{}] * len(chunk)))
        rows += [{"prompt": p, "response": a, "score": float(s)} for p, a, s in zip(chunk, answers, scores.tolist())]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--beta", type=float, default=4.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = offline_rows(args)
    data = args.out / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = [r["score"] for r in rows]
    print(f"offline data: {len(rows)} answers, rater mean {sum(scores) / len(scores):.3f}, "
          f"min {min(scores):.2f}, max {max(scores):.2f} ({time.perf_counter() - t0:.0f} s)")
    cmd = [sys.executable, "-m", "chatrlhf.cli", "ilql", "--model.name_or_path", args.model, "--data.datasets", f"[{data}]",
           "--eval_prompt_source", "demo:prompts_eval", "--reward", "rater",
           "--run.output_dir", str(args.out / "ilql"), "--run.overwrite", "true", "--max_steps", str(args.steps),
           "--beta", str(args.beta), "--generation.max_new_tokens", str(args.max_new_tokens), "--run.progress", "false"]
    print("$ chatrlhf", " ".join(cmd[3:]))
    t1 = time.perf_counter()
    if (rc := subprocess.run(cmd).returncode) != 0:
        raise SystemExit(rc)
    ev = json.loads((args.out / "ilql" / "eval.json").read_text())
    print(f"ilql: {time.perf_counter() - t1:.0f} s")
    for when, e in (("start", ev["start"] or {}), ("end", ev)):
        print(f"{when:>5}: rater mean, LM alone (beta 0) {e.get('reward/beta0', float('nan')):.3f}; "
              f"ILQL (beta {args.beta}) {e.get('reward/ilql', float('nan')):.3f}")
    print("samples (end, ILQL):", ev.get("samples/ilql"))


if __name__ == "__main__":
    main()
