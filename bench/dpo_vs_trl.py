"""DPO training throughput, pairs/s: chatrlhf's ``train_dpo`` against TRL's ``DPOTrainer``, same model and pairs.

Four runs, each in its own fresh Python process, one after another, with the same torch thread count:

    chatrlhf                 chatrlhf.stages.dpo.train_dpo(DPOConfig), its default: reference log-probs of
                             every pair computed once before training (with the starting policy), none per step
    chatrlhf-ref-per-step    the same with precompute_reference=False: a reference forward per micro-batch
    trl                      trl.DPOTrainer with TRL's default: a reference forward per step
    trl-precompute           trl.DPOTrainer with precompute_ref_log_probs=True

Same work on both sides: the same model (fp32, CPU), the same pairs tokenised once by chatrlhf.data (TRL is
given chatrlhf's prompt / chosen / rejected token ids, so the rows and padding are identical, which the TRL
worker checks on the first batch), the same batches in the same order (TRL reads them sequentially in the
order chatrlhf's seeded BatchPlan draws them), batch --batch-size pairs per optimizer step (no accumulation),
sigmoid loss with --beta, constant --lr without warm-up, AdamW betas (0.9, 0.95), eps 1e-8, no weight decay,
gradient-norm clip 1.0, dropout off, no gradient checkpointing, --warmup + --steps optimizer steps.

Timing: only the training loop. Each side stamps the end of every optimizer step (chatrlhf: a wrapper
around ``Engine.step`` returning True; TRL: a ``TrainerCallback.on_step_end``, called after the optimizer
step, LR step and zero_grad); a step's time is the gap between two consecutive stamps, so it covers batch
assembly, the forward(s), backward, clipping, the optimizer and each library's per-step logging. Model
loading, tokenisation, the reference precompute and everything after the last step (chatrlhf's final
eval and model save) fall outside; the first --warmup steps (at least 1, whose start has no stamp) are
dropped. The reference precompute is timed on its own (a wrapper around
``chatrlhf.reference.precompute_reference`` / ``DPOTrainer._precompute_ref_logps``) and reported beside
the loop, since it is the price of the precomputing runs' cheaper steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_vs_trl.py [--model smollm2-135m-instruct --pairs demo:pairs
        --steps 8 --warmup 2 --batch-size 4 --max-len 256 --threads <cores> --json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from common import (
    ADAM_BETAS,
    ADAM_EPS,
    MAX_GRAD_NORM,
    StepStats,
    load_average,
    machine_description,
    markdown_table,
    publish,
    run_sequentially,
    step_durations,
    usable_cores,
    worker_main,
)

IMPLS = ("chatrlhf", "chatrlhf-ref-per-step", "trl", "trl-precompute")


# ---- data: the same pairs, batches and order for every run ---------------------------------------------
def data_config(args, workdir: Path):
    """The chatrlhf DataConfig of the run: all of ``pairs.jsonl`` for the preference phase."""
    from chatrlhf.config import DataConfig

    return DataConfig(datasets=[str(workdir / "pairs.jsonl")], data_split="0,1,0", eval_fraction=0.0,
                      eval_datasets=[str(workdir / "eval.jsonl")], max_len=args.max_len,
                      max_prompt_len=args.max_len // 2)


def prepare_data(args, workdir: Path) -> dict:
    """Writes the pairs chatrlhf trains on (``pairs.jsonl``, a seeded sample of --pairs), one pair for its
    final evaluation (``eval.jsonl``), and ``trl.jsonl``: the same pairs as token ids in the order chatrlhf
    draws them, one row per pair per step, which TRL reads sequentially. Returns a description."""
    from chatrlhf.data import DataError, encode_records, load_rows, prepare_records
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.training import BatchPlan

    n_steps = args.warmup + args.steps
    _, rows = load_rows(args.pairs)
    need = args.batch_size * n_steps + 1
    if len(rows) < need:
        raise SystemExit(f"--pairs {args.pairs} has {len(rows)} rows; {need} are needed "
                         f"(--batch-size x (--warmup + --steps) + 1 for the final evaluation)")
    rows = random.Random(args.seed).sample([r for _, r in rows], need)
    for name, part in (("pairs", rows[:-1]), ("eval", rows[-1:])):
        with open(workdir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)

    # Exactly what train_dpo builds from the same config: the items and the BatchPlan's batches.
    tokenizer = load_tokenizer(args.model)
    records, _ = prepare_records(data_config(args, workdir), kind="preference", phase=2)
    try:
        items = encode_records(records, "preference", tokenizer, data_config(args, workdir), progress=False)
    except DataError as err:
        raise SystemExit(f"{err}\n(here the prompt limit is --max-len / 2 = {args.max_len // 2} tokens: raise "
                         f"--max-len)") from None
    plan = BatchPlan(len(items), args.batch_size, 1, 1, args.seed)
    plan.check("dpo benchmark")
    batches = [plan.batch(*divmod(step, plan.steps_per_epoch)) for step in range(n_steps)]
    with open(workdir / "trl.jsonl", "w") as f:
        for i in (i for batch in batches for i in batch):
            it, p = items[i], items[i]["prompt_len"]
            f.write(json.dumps({"prompt_ids": it["chosen_input_ids"][:p], "chosen_ids": it["chosen_input_ids"][p:],
                                "rejected_ids": it["rejected_input_ids"][p:]}) + "\n")
    # Work per step: 2B rows (chosen + rejected) padded to the longest row of the batch.
    padded = [2 * len(b) * max(len(items[i][k]) for i in b for k in ("chosen_input_ids", "rejected_input_ids"))
              for b in batches]
    real = [sum(len(items[i][k]) for i in b for k in ("chosen_input_ids", "rejected_input_ids")) for b in batches]
    return {"pairs": len(items), "truncated": items.stats.truncated, "mean_padded_tokens": statistics.fmean(padded),
            "real_fraction": sum(real) / sum(padded)}


# ---- the implementations (each runs in its own process, see worker()) ---------------------------------
def run_chatrlhf(args, workdir: Path, precompute: bool) -> dict:
    import chatrlhf.stages.dpo as dpo_stage
    from chatrlhf.config import EngineConfig, ModelConfig, RunConfig
    from chatrlhf.engine import Engine
    from chatrlhf.stages.dpo_config import DPOConfig

    # The stage has no hooks: stamp the Engine's applied optimizer steps and time the reference precompute.
    # The stage's own code runs unchanged.
    ends, precomputed = [], []
    engine_step, precompute_reference = Engine.step, dpo_stage.precompute_reference

    def stamped_step(self):
        applied = engine_step(self)
        if applied:
            ends.append(time.perf_counter())
        return applied

    def timed_precompute(reference, items, *a, **kw):
        start = time.perf_counter()
        precompute_reference(reference, items, *a, **kw)
        precomputed.append({"what": kw.get("desc", ""), "pairs": len(items), "seconds": time.perf_counter() - start})

    Engine.step, dpo_stage.precompute_reference = stamped_step, timed_precompute
    out = workdir / f"out-{'precompute' if precompute else 'per-step'}"
    cfg = DPOConfig(
        model=ModelConfig(name_or_path=args.model, dtype="float32"),
        data=data_config(args, workdir),
        engine=EngineConfig(micro_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=args.lr,
                            weight_decay=0.0, adam_betas=ADAM_BETAS, adam_eps=ADAM_EPS, lr_scheduler="constant",
                            warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, seed=args.seed),
        run=RunConfig(output_dir=str(out), overwrite=True, save_every=0, eval_every=0, eval_at_start=False,
                      log_every=1, progress=False),
        loss="sigmoid", beta=args.beta, precompute_reference=precompute, max_steps=args.warmup + args.steps,
    )
    dpo_stage.train_dpo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    train_pre = [p for p in precomputed if "train" in p["what"]]
    return {"ends": ends, "mean_loss": statistics.fmean(losses), "first_loss": losses[0],
            "precompute_seconds": sum(p["seconds"] for p in train_pre),
            "precompute_pairs": sum(p["pairs"] for p in train_pre),
            "optimizer": "Engine: torch.optim.AdamW, fused kernel (ZeRO 0)"}


def run_trl(args, workdir: Path, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from chatrlhf.data import PairCollator
    from chatrlhf.models.loading import load_tokenizer, resolve_model

    ends, precomputed, losses = [], [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **kw):  # after clip, optimizer step, LR step and zero_grad
            ends.append(time.perf_counter())

        def on_log(self, *a, logs=None, **kw):  # every step, as chatrlhf logs every step
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    # TRL tokenises prompt / chosen / rejected text itself; here the dataset already holds chatrlhf's token
    # ids (prompt_ids / chosen_ids / rejected_ids, the columns TRL's tokenisation produces), so that both
    # sides train on identical rows. Only this untimed preprocessing is skipped.
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **kw: dataset
    precompute_ref_logps = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):
        start = time.perf_counter()
        out = precompute_ref_logps(self, dataset, name, batch_size)
        precomputed.append({"what": name, "pairs": len(dataset), "seconds": time.perf_counter() - start})
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    examples = [json.loads(line) for line in (workdir / "trl.jsonl").read_text().splitlines()]
    path = resolve_model(args.model)
    optim = {"optim": args.trl_optim} if args.trl_optim else {}
    config = DPOConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, max_grad_norm=MAX_GRAD_NORM, seed=args.seed,
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_len, precompute_ref_log_probs=precompute,
        disable_dropout=True,
        # The rows are already in chatrlhf's batch order; read them as they are.
        train_sampling_strategy="sequential",
        # TRL's defaults turn bf16 and activation checkpointing on (on CPU too).
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        # Per-step loss logging, as the chatrlhf runs do (log_every=1); nothing is saved or evaluated.
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, **optim,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, callbacks=[StepClock()])
    # Same rows, same padding: TRL's first batch against chatrlhf's PairCollator on the same pairs.
    first = examples[: args.batch_size]
    trl_batch = trainer.data_collator(first)
    ours = PairCollator(pad_id=tokenizer.pad_token_id)(
        [{"chosen_input_ids": e["prompt_ids"] + e["chosen_ids"],
          "rejected_input_ids": e["prompt_ids"] + e["rejected_ids"], "prompt_len": len(e["prompt_ids"])}
         for e in first])
    if not (torch.equal(trl_batch["input_ids"], ours["input_ids"])
            and torch.equal(trl_batch["attention_mask"], ours["attention_mask"])):
        raise RuntimeError("TRL's collated batch differs from chatrlhf's on the same pairs; the comparison would "
                           "not be like for like")
    trainer.train()
    train_pre = [p for p in precomputed if p["what"] == "train"]
    optim_name = getattr(config.optim, "value", config.optim)
    return {"ends": ends, "mean_loss": statistics.fmean(losses), "first_loss": losses[0],
            "precompute_seconds": sum(p["seconds"] for p in train_pre),
            "precompute_pairs": sum(p["pairs"] for p in train_pre),
            "optimizer": f"optim={optim_name} (DPOConfig.optim)"}


WORKERS = {
    "chatrlhf": lambda args, workdir: run_chatrlhf(args, workdir, precompute=True),
    "chatrlhf-ref-per-step": lambda args, workdir: run_chatrlhf(args, workdir, precompute=False),
    "trl": lambda args, workdir: run_trl(args, workdir, precompute=False),
    "trl-precompute": lambda args, workdir: run_trl(args, workdir, precompute=True),
}


# ---- report ---------------------------------------------------------------------------------------------
def report(results: dict[str, dict], args, data: dict) -> str:
    b = args.batch_size
    stats = {impl: StepStats.of(step_durations(r["ends"])[args.warmup - 1 :]) for impl, r in results.items()}

    def with_precompute(impl: str) -> float:
        """Pairs/s over an epoch when the precompute is spread over the pairs it scored."""
        r = results[impl]
        per_pair = r["precompute_seconds"] / r["precompute_pairs"] if r["precompute_pairs"] else 0.0
        return 1.0 / (stats[impl].median / b + per_pair)

    rows = []
    for impl, r in results.items():
        s = stats[impl]
        ref = "precomputed" if r["precompute_pairs"] else "forward per step"
        pre = f"{r['precompute_seconds']:.1f}" if r["precompute_pairs"] else "-"
        rows.append([impl, ref, f"{s.median:.3f}", f"{s.minimum:.3f}", f"{s.stdev:.3f}", f"{b / s.median:.2f}", pre,
                     f"{with_precompute(impl):.2f}", f"{r['first_loss']:.4f}", f"{r['mean_loss']:.4f}"])
    headers = ["implementation", "reference log-probs", "step median (s)", "step min (s)", "step stdev (s)",
               "pairs/s", "precompute (s)", "pairs/s incl. precompute", "step-1 loss", "mean loss"]
    ratio_rows = []
    for ours in (i for i in ("chatrlhf", "chatrlhf-ref-per-step") if i in results):
        for base in (i for i in ("trl", "trl-precompute") if i in results):
            ratio_rows.append([f"{ours} vs {base}", f"{stats[base].median / stats[ours].median:.2f}",
                               f"{with_precompute(ours) / with_precompute(base):.2f}"])
    notes = [f"- {impl}: {r['optimizer']}; torch threads after training: {r['threads_after']}"
             for impl, r in results.items()]
    lines = [
        f"machine: {machine_description(args.threads)}",
        f"model {args.model} fp32 | {data['pairs']} pairs from {args.pairs} ({data['truncated']} cut to --max-len "
        f"{args.max_len}) | batch {b} pairs = {2 * b} rows, {data['mean_padded_tokens']:.0f} padded tokens per step "
        f"on average ({data['real_fraction']:.0%} real) | {args.steps} timed steps after {args.warmup} warm-up | "
        f"lr {args.lr}, beta {args.beta} | load avg at end {load_average()}",
        "",
        markdown_table(headers, rows),
        "",
        "pairs/s = batch / median step time (training loop only). pairs/s incl. precompute = 1 / (median step / "
        "batch + precompute seconds / pairs precomputed): the rate over an epoch, reference pass included.",
        *notes,
    ]
    if ratio_rows:
        lines += ["", markdown_table(["speed-up (> 1: chatrlhf faster)", "training loop", "incl. precompute"],
                                     ratio_rows)]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama) or a local HF model dir")
    p.add_argument("--pairs", default="demo:pairs", help="preference pairs: demo:pairs or a .jsonl/.json/.csv file")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (no accumulation)")
    p.add_argument("--max-len", type=int, default=256, help="prompt + answer tokens per row, at most")
    p.add_argument("--lr", type=float, default=5e-6, help="constant learning rate, no warm-up")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads for every run")
    p.add_argument("--trl-optim", default=None,
                   help="TRL's DPOConfig.optim (default: TRL's own, adamw_torch_fused, the kernel "
                        "chatrlhf's Engine uses at ZeRO 0; adamw_torch = the for-loop one)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the raw step stamps and results here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_len < 16:
        p.error(f"--max-len must be >= 16 (half of it is the prompt limit), got {args.max_len}")
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(WORKERS, args.worker, args.workdir)
        return
    results, data = run_sequentially(args, IMPLS, __file__, prepare_data, "dpo-vs-trl-")
    publish(report(results, args, data), args, data, results)


if __name__ == "__main__":
    main()
