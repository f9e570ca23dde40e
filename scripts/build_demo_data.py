"""Rebuild the demo task's preference pairs from the default model's own samples.

For each training prompt in ``src/chatrlhf/demo_data/prompts_train.jsonl`` the embedded default model
(SmolLM2-135M-Instruct) samples ``--n`` answers; the simulated rater scores them; the best answer
becomes ``chosen`` (the SFT demonstration: best-of-n) and the worst ``rejected``. Pairs whose scores
are within ``--min-gap`` are near-ties and are left out. Output: ``demo_data/pairs.jsonl`` from the
training prompts and ``demo_data/pairs_eval.jsonl`` from the held-out prompts (the reward model's eval set).

Generation is resumable: finished prompts are appended to ``pairs.jsonl.partial`` and skipped on a rerun.

    .venv/bin/python scripts/build_demo_data.py            # full rebuild (tens of minutes on 2 CPU cores)
    .venv/bin/python scripts/build_demo_data.py --limit 16 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from chatrlhf.data import DEMO_DIR
from chatrlhf.models import load_causal_lm, load_tokenizer
from chatrlhf.rewards.rater import SimulatedRater


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.inference_mode()
def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float):
    """n sampled answers per prompt -> list of (text, truncated) lists."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    gen = out[:, enc["input_ids"].shape[1] :]  # (len(prompts) * n, new)
    results = []
    for row in gen.tolist():
        ended = tokenizer.eos_token_id in row
        row = row[: row.index(tokenizer.eos_token_id)] if ended else row
        results.append((tokenizer.decode(row, skip_special_tokens=True).strip(), not ended))
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--min-gap", type=float, default=0.05, help="drop pairs whose rater scores differ by less")
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path(DEMO_DIR))
    args = ap.parse_args()
    tokenizer = load_tokenizer("smollm2-135m-instruct", padding_side="left")
    model = load_causal_lm("smollm2-135m-instruct").eval()
    rater = SimulatedRater()
    for split, name in (("train", "pairs"), ("eval", "pairs_eval")):
        prompts = read_jsonl(Path(DEMO_DIR) / f"prompts_{split}.jsonl")
        prompts = prompts[: args.limit] if args.limit else prompts
        build(args, model, tokenizer, rater, prompts, args.out_dir / f"{name}.jsonl")


def build(args, model, tokenizer, rater, prompts: list[dict], out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    done = {r["id"]: r for r in read_jsonl(partial)} if partial.exists() else {}
    todo = sorted((p for p in prompts if p["id"] not in done), key=lambda p: len(p["prompt"]))

    start = time.time()
    with open(partial, "a") as f:
        for i in tqdm(range(0, len(todo), args.batch_prompts), desc="prompts", unit="batch"):
            batch = todo[i : i + args.batch_prompts]
            # A seed per batch position keeps reruns reproducible whatever was already done.
            torch.manual_seed(args.seed * 1_000_003 + sum(zlib.crc32(p["id"].encode()) for p in batch))
            answers = sample(model, tokenizer, [p["prompt"] for p in batch], args.n, args.max_new_tokens, args.temperature, args.top_p)
            for p, cands in zip(batch, answers):
                scores = rater.score_overall(
                    [p["prompt"]] * len(cands), [c[0] for c in cands], harmful=[p["harmful"]] * len(cands), truncated=[c[1] for c in cands]
                )
                ranked = sorted(zip(scores, cands), key=lambda t: -t[0])
                row = {**p, "samples": [{"text": c[0], "truncated": c[1], "score": round(s, 4)} for s, c in ranked]}
                f.write(json.dumps(row) + "\n")
                done[p["id"]] = row
    pairs = []
    for p in prompts:
        samples = done[p["id"]]["samples"]
        best, worst = samples[0], samples[-1]
        if best["score"] - worst["score"] < args.min_gap or not best["text"] or not worst["text"]:
            continue
        pairs.append(
            {
                "id": p["id"], "category": p["category"], "harmful": p["harmful"], "prompt": p["prompt"],
                "chosen": best["text"], "rejected": worst["text"],
                "chosen_score": best["score"], "rejected_score": worst["score"],
            }
        )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    os.replace(tmp, out)
    gap = sum(r["chosen_score"] - r["rejected_score"] for r in pairs) / max(len(pairs), 1)
    print(f"{len(pairs)} pairs from {len(prompts)} prompts (mean rater gap {gap:.3f}) -> {out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
