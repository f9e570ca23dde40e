"""Padded vs packed (padding-free) forwards on the demo data mix, with the default model, in one run.

For each phase, the same micro-batches run padded and packed in turns (padded, packed, padded, ...), each a
full forward + backward (or a no-grad forward for PPO's scoring), through chatrlhf's own code paths:

    sft         chatrlhf.stages.sft.forward_nll on demo SFT examples (prompt + chosen answer), + backward
    rm          RewardModel (its ``packing`` switch) on demo pairs (2B rows), pairwise loss + backward
    ppo-score   answer_logits of the actor and the reference, and the critic's values, no grad (a rollout
                batch: demo prompts, left-padded, answered by the demo's chosen answers, right-padded)
    ppo-update  the same with gradients: actor log-probs + critic values, + backward

Useful tokens/s counts real (non-padding) tokens only. Printed per phase: the padding share of the positions
each layout computes, the median time per micro-batch, useful tokens/s and packed / padded.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/packing.py [--batches 8 --micro-batch 8 --precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import bf16_description, machine_description, markdown_table

from chatrlhf.data import PairCollator, PromptCollator, SFTCollator, encode_records, load_records, to_sft
from chatrlhf.data.packing import plan_packing
from chatrlhf.models import RewardModel, load_causal_lm, load_tokenizer
from chatrlhf.rollout import answer_logits
from chatrlhf.stages.sft import forward_nll


def batches(args, tok) -> dict[str, list[dict]]:
    pairs, _ = load_records("demo:pairs")
    pairs = pairs[: args.batches * args.micro_batch]
    sft_items = encode_records([to_sft(r) for r in pairs], "sft", tok, max_len=512, progress=False)
    pair_items = encode_records(pairs, "preference", tok, max_len=512, max_prompt_len=256, progress=False)
    prompts = encode_records([{"prompt": r["prompt"]} for r in pairs], "prompt", tok, max_prompt_len=256,
                             progress=False)
    answers = [it["chosen_input_ids"][it["prompt_len"] :] for it in pair_items]
    out: dict[str, list[dict]] = {"sft": [], "rm": [], "ppo": []}
    for i in range(0, len(pairs), args.micro_batch):
        rows = slice(i, i + args.micro_batch)
        out["sft"].append(SFTCollator(tok.pad_token_id)(sft_items[rows]))
        out["rm"].append(PairCollator(tok.pad_token_id)(pair_items[rows]))
        p = PromptCollator(tok.pad_token_id)(prompts[rows])
        a = SFTCollator(tok.pad_token_id)([{"input_ids": x, "labels": x} for x in answers[rows]])
        out["ppo"].append({"input_ids": torch.cat([p["input_ids"], a["input_ids"]], 1),
                           "attention_mask": torch.cat([p["attention_mask"], a["attention_mask"]], 1),
                           "answer_len": a["input_ids"].shape[1]})
    return out


def run_phase(name: str, batch: dict, packing: bool, lm, rm) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if name == "sft":
        nll, _ = forward_nll(lm, batch, packing)
        nll.sum().backward()
    elif name == "rm":
        rm.packing = packing
        scores = rm(ids, mask)
        p = batch["num_pairs"]
        torch.nn.functional.logsigmoid(scores[:p] - scores[p:]).sum().neg().backward()
    else:
        grad = name == "ppo-update"
        with contextlib.nullcontext() if grad else torch.no_grad():
            logits = answer_logits(lm, ids, mask, batch["answer_len"], packing=packing)
            rm.packing = packing
            values = rm(ids, mask, per_token=True)
            if not grad:
                answer_logits(lm, ids, mask, batch["answer_len"], packing=packing)  # the reference's pass
            else:
                (logits.logsumexp(-1).mean() + values.mean()).backward()


def padding(batch: dict) -> tuple[float, float]:
    return plan_packing(batch["attention_mask"]).padding_fraction()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_description(args.threads))
    print(bf16_description())
    tok = load_tokenizer(args.model)
    lm, rm = load_causal_lm(args.model).train(), RewardModel.from_causal_lm(args.model).train()
    data = batches(args, tok)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    rows = []
    for phase, key in (("sft", "sft"), ("rm", "rm"), ("ppo-score", "ppo"), ("ppo-update", "ppo")):
        times: dict[bool, list[float]] = {False: [], True: []}
        for i, batch in enumerate(data[key]):
            for packing in (False, True):
                lm.zero_grad(set_to_none=True)
                rm.zero_grad(set_to_none=True)
                start = time.perf_counter()
                with autocast:
                    run_phase(phase, batch, packing, lm, rm)
                if i >= args.warmup:
                    times[packing].append(time.perf_counter() - start)
        real = sum(int(b["attention_mask"][:, :].sum()) for b in data[key][args.warmup :]) / len(data[key][args.warmup :])
        pads = [padding(b) for b in data[key]]
        tps = {p: real / statistics.median(t) for p, t in times.items()}
        rows.append([phase, f"{statistics.mean(x[0] for x in pads):.1%}", f"{statistics.mean(x[1] for x in pads):.1%}",
                     f"{statistics.median(times[False]) * 1e3:.0f}", f"{statistics.median(times[True]) * 1e3:.0f}",
                     f"{tps[False]:.0f}", f"{tps[True]:.0f}", f"{tps[True] / tps[False]:.2f}x"])
        print(rows[-1], flush=True)
    print(f"\n{args.model}, {args.precision}, micro-batch {args.micro_batch}, {args.batches} batches "
          f"({args.warmup} warm-up) per phase, padded and packed in turns\n")
    print(markdown_table(["phase", "padding (padded)", "padding (packed)", "ms padded", "ms packed",
                          "useful tok/s padded", "useful tok/s packed", "packed / padded"], rows))


if __name__ == "__main__":
    main()
