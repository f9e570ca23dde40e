"""How an optimizer step's rows are cut into micro-batches, measured on the demo data mix with the default model.

The same steps (``--rows`` rows each, drawn in the data's shuffled order, as a training step draws them) run in
every way, through chatrlhf's own forwards (the phases of bench/packing.py), one after another per step:

    rows, padded         micro-batches of ``--micro-batch`` rows in draw order, padded (before issue 19)
    rows, packed         the same micro-batches, packed (``--engine.packing``, before sorting)
    sorted, packed       the step's rows sorted by length, then cut (the default now)
    budget, packed       sorted, cut by ``--engine.max_tokens_per_micro_batch`` (the step's tokens / the
                         number of row micro-batches, so the forwards' count is about the same)
    sorted, padded       sorted, padded (``--engine.packing false``)

The cuts come from ``chatrlhf.data.micro_batches.split``. Printed per phase and way: the padding share of the
positions computed, the micro-batches per step, the median step time, useful (real) tokens/s and the ratio
to "rows, padded".

    HF_HUB_OFFLINE=1 .venv/bin/python bench/micro_batches.py [--steps 3 --rows 32 --micro-batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import bf16_description, machine_description, markdown_table
from packing import run_phase

from chatrlhf.data import PairCollator, PromptCollator, SFTCollator, encode_records, load_records, to_sft
from chatrlhf.data.micro_batches import RowSize, row_size, split
from chatrlhf.data.packing import plan_packing
from chatrlhf.models import RewardModel, load_causal_lm, load_tokenizer

WAYS = {  # name -> (sorted, token budget, packed)
    "rows, padded": (False, False, False),
    "rows, packed": (False, False, True),
    "sorted, packed": (True, False, True),
    "budget, packed": (True, True, True),
    "sorted, padded": (True, False, False),
}


def items(tok, n: int) -> dict[str, list]:
    pairs, _ = load_records("demo:pairs")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:n].tolist()
    pairs = [pairs[i] for i in order]
    pair_items = encode_records(pairs, "preference", tok, max_len=512, max_prompt_len=256, progress=False)
    prompts = encode_records([{"prompt": r["prompt"]} for r in pairs], "prompt", tok, max_prompt_len=256,
                             progress=False)
    answers = [{"input_ids": it["chosen_input_ids"][it["prompt_len"] :]} for it in pair_items]
    answers = [{**a, "labels": a["input_ids"]} for a in answers]
    return {"sft": encode_records([to_sft(r) for r in pairs], "sft", tok, max_len=512, progress=False),
            "rm": pair_items, "ppo": list(zip(prompts, answers))}


def rollout(tok, rows: list) -> dict:
    """One PPO rollout batch: prompts left-padded and answers right-padded to the whole batch's widths."""
    p = PromptCollator(tok.pad_token_id)([r[0] for r in rows])
    a = SFTCollator(tok.pad_token_id)([r[1] for r in rows])
    return {"input_ids": torch.cat([p["input_ids"], a["input_ids"]], 1),
            "attention_mask": torch.cat([p["attention_mask"], a["attention_mask"]], 1), "answer_len": a["input_ids"].shape[1]}


def cut(key: str, step: list, tok, way: tuple[bool, bool, bool], micro: int) -> list[dict]:
    """The step's micro-batches, collated."""
    sort, budget, packed = way
    if key == "ppo":
        batch = rollout(tok, step)
        sizes = [RowSize(int(n), batch["attention_mask"].shape[1]) for n in batch["attention_mask"].sum(-1)]
    else:
        sizes = [row_size(it) for it in step]
    if not sort:
        groups = [list(range(i, i + micro)) for i in range(0, len(step), micro)]
    else:
        max_tokens = -(-sum(s.tokens if packed else s.width for s in sizes) // (len(step) // micro)) if budget else 0
        groups = split(range(len(step)), sizes, micro, max_tokens, packed)
    if key == "ppo":
        return [{"input_ids": batch["input_ids"][g], "attention_mask": batch["attention_mask"][g],
                 "answer_len": batch["answer_len"]} for g in groups]
    collate = SFTCollator(tok.pad_token_id) if key == "sft" else PairCollator(tok.pad_token_id)
    return [collate([step[i] for i in g]) for g in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--phases", default="sft,rm,ppo-score,ppo-update")
    args = parser.parse_args()
    print(machine_description(None))
    print(bf16_description())
    tok = load_tokenizer(args.model)
    lm, rm = load_causal_lm(args.model).train(), RewardModel.from_causal_lm(args.model).train()
    data = items(tok, (args.steps + 1) * args.rows)  # the first step warms up
    table = []
    for phase in args.phases.split(","):
        key = "ppo" if phase.startswith("ppo") else phase
        times = {w: [] for w in WAYS}
        stats = {w: [0, 0, 0] for w in WAYS}  # real tokens, positions, micro-batches (timed steps)
        for s in range(args.steps + 1):
            step = data[key][s * args.rows : (s + 1) * args.rows]
            for name, way in WAYS.items():
                batches = cut(key, step, tok, way, args.micro_batch)
                lm.zero_grad(set_to_none=True)
                rm.zero_grad(set_to_none=True)
                start = time.perf_counter()
                for batch in batches:
                    run_phase(phase, batch, way[2], lm, rm)
                if s == 0:
                    continue
                times[name].append(time.perf_counter() - start)
                for batch in batches:
                    plan = plan_packing(batch["attention_mask"])
                    stats[name][0] += plan.src.numel()
                    stats[name][1] += plan.packed_rows * plan.packed_width if way[2] else plan.rows * plan.width
                stats[name][2] += len(batches)
        tps = {name: stats[name][0] / args.steps / statistics.median(times[name]) for name in WAYS}
        for name in WAYS:
            real, positions, n = stats[name]
            table.append([phase, name, f"{1 - real / positions:.1%}", f"{n / args.steps:.1f}",
                          f"{statistics.median(times[name]):.2f}", f"{tps[name]:.0f}",
                          f"{tps[name] / tps['rows, padded']:.2f}x"])
            print(table[-1], flush=True)
    print(f"\n{args.model}, fp32, steps of {args.rows} rows, micro-batch {args.micro_batch}, {args.steps} timed "
          "steps (after one warm-up) per phase\n")
    print(markdown_table(["phase", "micro-batches", "padding", "forwards / step", "s / step", "useful tok/s",
                          "vs rows, padded"], table))


if __name__ == "__main__":
    main()
