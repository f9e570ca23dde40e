"""SFT training throughput on the embedded default model: plain PyTorch vs TRL's SFTTrainer vs chatrlhf.

All three train SmolLM2-135M-Instruct (fp32, CPU) on the SAME tokenised conversations, with the same
batch size, sequence length, learning rate, AdamW betas, grad-norm clip and number of steps, and the
loss on assistant tokens only:

    plain     AutoModelForCausalLM + torch.optim.AdamW + masked cross-entropy, a hand-written loop
    trl       trl.SFTTrainer via its Python API, fed the same input_ids and labels (no packing, no eval,
              no saving, logging off, 0 dataloader workers, fp32, no gradient checkpointing)
    chatrlhf  chatrlhf.stages.sft.train_sft(cfg) itself; step times from its metrics.jsonl timestamps

Every conversation is longer than --max-len and cut to it, so every batch is exactly (batch, max_len)
whatever order an implementation draws the records in, and all tokens are real (no padding). Each
implementation runs in its own fresh Python process (no shared allocator, thread pool or process
group), with the same torch thread count; the first --warmup steps are excluded from the timing.
With --rounds > 1 the implementations alternate, in a rotating order, so drifts of a shared machine
hit all of them.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_throughput.py [--steps 10 --warmup 2 --batch-size 4
        --max-len 256 --rounds 1 --threads <usable cores> --json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import StepStats, load_average, machine_description, markdown_table, step_durations, usable_cores

IMPLS = ("plain", "trl", "chatrlhf")
MODEL = "smollm2-135m-instruct"
ADAM_BETAS = (0.9, 0.95)  # chatrlhf's (DeepSpeed-Chat's) betas; TRL's default beta2 is 0.999
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}

# ---- data: synthetic multi-turn conversations ----------------------------------------------------------
_SUBJECTS = ("a sourdough starter", "a small vegetable garden", "a home Wi-Fi network", "a monthly budget",
             "a job interview", "a 5 km running plan", "a Python script that renames files",
             "a birthday party for ten people", "a study plan for exams", "a bike that squeaks")
_ASKS = ("How do I get started with {s}? I have about {n} hours a week and little experience.",
         "What are the most common mistakes people make with {s}, and how can I avoid them?",
         "Can you give me a practical, step-by-step plan for {s}?")
_FOLLOW_UPS = ("Thanks! Could you say more about step {k}?", "What should I do if that does not work?",
               "How long will it take before I see results?")
_STEPS = ("Start small: spend the first {n} days on the basics of {s} before adding anything new.",
          "Write down what you did each day, because notes make it easy to see what actually works.",
          "Set a limit of about {m} dollars so the project stays affordable while you learn.",
          "Ask someone who has done {s} before; ten minutes of advice can save you a week.",
          "Check your progress every {n} days and change only one thing at a time.",
          "Keep everything you need in one place, so that getting started takes less than a minute.",
          "Expect a few setbacks in the first weeks; they are normal and usually easy to fix.",
          "Follow one good guide closely at first instead of mixing advice from many sources.")


def _answer(rng: random.Random, subject: str) -> str:
    steps = rng.sample(_STEPS, rng.randint(4, 6))
    body = "\n".join(f"{i}. " + s.format(s=subject, n=rng.randint(2, 9), m=rng.randint(20, 200))
                     for i, s in enumerate(steps, 1))
    return f"Good question. Here is what usually works for {subject}:\n\n{body}\n\nGood luck, and enjoy it!"


def synthetic_records(tokenizer, n: int, max_len: int, seed: int) -> list[dict]:
    """``n`` sft records (``{"messages": [...]}``), each longer than ``max_len`` tokens after the template,
    so that truncation makes every encoded example exactly ``max_len`` long."""
    records = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        subject = rng.choice(_SUBJECTS)
        msgs = [{"role": "user", "content": rng.choice(_ASKS).format(s=subject, n=rng.randint(2, 10))}]
        msgs.append({"role": "assistant", "content": _answer(rng, subject)})
        while len(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)) <= max_len:
            msgs.append({"role": "user", "content": rng.choice(_FOLLOW_UPS).format(k=rng.randint(1, 4))})
            msgs.append({"role": "assistant", "content": _answer(rng, subject)})
        records.append({"messages": msgs})
    return records


def prepare_data(args, workdir: Path) -> dict:
    """Writes ``records.jsonl`` (chat records, read by the chatrlhf stage), ``eval.jsonl`` (one record for
    the stage's final evaluation) and ``items.jsonl`` (the same records tokenised by chatrlhf.data, read by
    the plain and TRL workers). Returns a description of the data."""
    from chatrlhf.data import encode_records
    from chatrlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    n = args.batch_size * (args.warmup + args.steps)
    records = synthetic_records(tokenizer, n + 1, args.max_len, args.seed)
    items = list(encode_records(records[:n], "sft", tokenizer, max_len=args.max_len,
                                max_prompt_len=args.max_len // 2, progress=False))
    short = [i for i, it in enumerate(items) if len(it["input_ids"]) != args.max_len]
    if len(items) != n or short:
        raise RuntimeError(f"expected {n} items of exactly {args.max_len} tokens; got {len(items)}, short: {short}")
    for name, rows in (("records", records[:n]), ("eval", records[n:]), ("items", items)):
        with open(workdir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    labelled = sum(sum(t != -100 for t in it["labels"][1:]) for it in items)
    return {"records": n, "labelled_fraction": labelled / (n * (args.max_len - 1))}


def _read_items(workdir: Path) -> list[dict]:
    with open(workdir / "items.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- the three implementations (each runs in its own worker process) ----------------------------------
def run_plain(args, workdir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from chatrlhf.models.loading import resolve_model

    items = _read_items(workdir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed)).tolist()
    stamps, losses = [time.perf_counter()], []
    for step in range(args.warmup + args.steps):
        batch = [items[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
        ids = torch.tensor([b["input_ids"] for b in batch])  # (B, T), all rows full length
        labels = torch.tensor([b["labels"] for b in batch])  # (B, T), -100 off assistant tokens
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, T, V)
        # Position t predicts token t+1; the mean runs over the labelled tokens of the batch.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return {"durations": step_durations(stamps), "mean_loss": sum(losses) / len(losses),
            "optimizer": "torch.optim.AdamW (default: for-loop on CPU)"}


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatrlhf.models.loading import resolve_model

    class StepClock(TrainerCallback):
        stamps: list[float] = []

        def on_train_begin(self, *a, **kw):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, *a, **kw):  # after clip, optimizer step, LR step and zero_grad
            self.stamps.append(time.perf_counter())

    path = resolve_model(MODEL)
    config = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, max_grad_norm=MAX_GRAD_NORM, seed=args.seed,
        max_length=args.max_len, packing=False, padding_free=False,
        # The labels column already masks everything but assistant tokens (built by chatrlhf.data, the
        # same tensors the other two train on); TRL keeps a given "labels" column as is.
        completion_only_loss=False, assistant_only_loss=False,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,  # TRL defaults: bf16 and GC on
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_read_items(workdir)),
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[clock])
    result = trainer.train()
    return {"durations": step_durations(clock.stamps), "mean_loss": result.training_loss,
            "optimizer": f"optim={config.optim}"}


def _chatrlhf_stamps(metrics_path: Path, n_steps: int) -> list[float]:
    """Wall-clock stamps of the stage's start-of-training row and of each step's train row."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = sorted((r for r in rows if any(k.startswith("train/") for k in r)), key=lambda r: r["step"])
    if [r["step"] for r in train] != list(range(1, n_steps + 1)):
        raise RuntimeError(f"{metrics_path}: expected one train row per step 1..{n_steps} (run.log_every=1), "
                           f"got steps {[r['step'] for r in train]}")
    first = rows.index(train[0])
    before = [rows[first - 1]["time"]] if first > 0 else []  # the "data/..." row logged just before the loop
    return before + [r["time"] for r in train]


def run_chatrlhf(args, workdir: Path) -> dict:
    from chatrlhf.config import DataConfig, EngineConfig, ModelConfig, RunConfig, SFTConfig
    from chatrlhf.stages.sft import train_sft

    n_steps = args.warmup + args.steps
    out = workdir / "chatrlhf"
    cfg = SFTConfig(
        model=ModelConfig(name_or_path=MODEL, dtype="float32"),
        data=DataConfig(datasets=[str(workdir / "records.jsonl")], data_split="1,0,0", eval_fraction=0.0,
                        eval_datasets=[str(workdir / "eval.jsonl")], max_len=args.max_len,
                        max_prompt_len=args.max_len // 2),
        engine=EngineConfig(micro_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=args.lr,
                            weight_decay=0.0, adam_betas=ADAM_BETAS, adam_eps=ADAM_EPS, lr_scheduler="constant",
                            warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, seed=args.seed),
        run=RunConfig(output_dir=str(out), overwrite=True, save_every=0, eval_every=0, log_every=1, progress=False),
        epochs=1,
        max_steps=n_steps,
    )
    train_sft(cfg)
    stamps = _chatrlhf_stamps(out / "metrics.jsonl", n_steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    durations = step_durations(stamps)
    if len(durations) < n_steps:  # no start row: the first step is unmeasured, and it is warm-up anyway
        durations = [float("nan")] + durations
    return {"durations": durations, "mean_loss": sum(losses) / len(losses),
            "optimizer": "Engine: torch.optim.AdamW under DeepSpeed ZeRO-0"}


WORKERS = {"plain": run_plain, "trl": run_trl, "chatrlhf": run_chatrlhf}


def worker_main(impl: str, workdir: Path) -> None:
    import torch

    args = argparse.Namespace(**json.loads((workdir / "args.json").read_text()))
    torch.set_num_threads(args.threads)
    result = WORKERS[impl](args, workdir)
    result["threads_after"] = torch.get_num_threads()  # a library that changed it would skew the comparison
    (workdir / f"result-{impl}.json").write_text(json.dumps(result))


# ---- orchestration and report -------------------------------------------------------------------------
def launch(impl: str, workdir: Path, threads: int) -> dict:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = workdir / f"log-{impl}.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", impl, "--workdir", str(workdir)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{impl} worker failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return json.loads((workdir / f"result-{impl}.json").read_text())


def report(results: dict[str, list[dict]], args, data: dict) -> str:
    # NaN marks a step the chatrlhf metrics could not time (no start row); it can only be a warm-up step.
    stats = {impl: StepStats.of([d for run in runs for d in run["durations"][args.warmup:] if math.isfinite(d)])
             for impl, runs in results.items()}
    tokens = args.batch_size * args.max_len
    speed = {impl: tokens / s.median for impl, s in stats.items()}
    rows = []
    for impl, s in stats.items():
        mean_loss = sum(r["mean_loss"] for r in results[impl]) / len(results[impl])
        rows.append([impl, f"{s.median:.3f}", f"{s.mean:.3f}", f"{s.minimum:.3f}", f"{s.stdev:.3f}",
                     f"{speed[impl]:.1f}", f"{args.batch_size / s.median:.3f}",
                     f"{speed[impl] / speed['plain']:.2f}" if "plain" in speed else "-",
                     f"{speed[impl] / speed['trl']:.2f}" if "trl" in speed else "-", f"{mean_loss:.4f}"])
    headers = ["implementation", "step median (s)", "step mean (s)", "step min (s)", "step stdev (s)",
               "tokens/s", "samples/s", "x plain", "x TRL", "mean loss"]
    notes = [f"- {impl}: {results[impl][0]['optimizer']}; torch threads after run "
             f"{sorted({r['threads_after'] for r in results[impl]})}" for impl in results]
    return "\n".join([
        f"machine: {machine_description(args.threads)}",
        f"model {MODEL} fp32 | batch {args.batch_size} x {args.max_len} tokens (no padding; "
        f"{data['labelled_fraction']:.0%} of predicted tokens are assistant tokens) | {args.steps} timed steps "
        f"after {args.warmup} warm-up, x {args.rounds} round(s) | lr {args.lr} | load avg {load_average()}",
        "",
        markdown_table(headers, rows),
        "",
        "tokens/s and samples/s from the median step; x plain / x TRL = throughput ratio (> 1 is faster).",
        *notes,
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per implementation and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, lazy init)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step (no accumulation)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (every sequence is this long)")
    p.add_argument("--lr", type=float, default=2e-5, help="constant learning rate, no warm-up")
    p.add_argument("--rounds", type=int, default=1, help="repeat all implementations, rotating their order")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads for every worker")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the raw per-step durations here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.max_len < 16:
        p.error(f"--warmup must be >= 0 and --max-len >= 16, got {args.warmup} and {args.max_len}")
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir)
        return
    os.environ.update(OFFLINE_ENV)
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        workdir = Path(tmp)
        shared = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "workdir")}
        (workdir / "args.json").write_text(json.dumps(shared))
        data = prepare_data(args, workdir)
        results: dict[str, list[dict]] = {i: [] for i in impls}
        for r in range(args.rounds):
            for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
                t0 = time.perf_counter()
                results[impl].append(launch(impl, workdir, args.threads))
                print(f"round {r + 1}/{args.rounds} {impl}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = report(results, args, data)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"report": text, "data": data, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
