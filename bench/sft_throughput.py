"""SFT training throughput on the embedded default model: plain PyTorch vs TRL's SFTTrainer vs chatrlhf.

All three train SmolLM2-135M-Instruct (fp32, CPU) on the SAME tokenised conversations, with the same
batch size, sequence length, learning rate, AdamW betas, grad-norm clip and number of steps, and the
loss on assistant tokens only:

    plain     AutoModelForCausalLM + torch.optim.AdamW + masked cross-entropy, a hand-written loop
    trl       trl.SFTTrainer via its Python API, fed the same input_ids and labels (no packing, no eval,
              no saving, logging off, 0 dataloader workers, fp32, no gradient checkpointing)
    chatrlhf  chatrlhf.stages.sft.train_sft(cfg) itself (Engine, token_nll, chatrlhf.data), --run.precision fp32
    chatrlhf-bf16  the same in mixed precision (--run.precision bf16: fp32 master weights and AdamW state,
              forwards and backwards under bf16 autocast); its ratio to `plain` is the mixed-precision speed-up

Every conversation is longer than --max-len and cut to it, so every batch is exactly (batch, max_len)
whatever order an implementation draws the records in, and all tokens are real (no padding).

Each implementation runs in its own fresh Python process with the same torch thread count; the parent
hands out the steps one at a time, and each step is timed inside its process from "go" to the end of
its optimizer step; the first --warmup steps are dropped. --schedule sequential (default) runs the
implementations one after another, each alone on the machine; --schedule turns keeps all three
resident and lets them take turns step by step, so a drifting machine slows all alike (at the cost of
memory; see bench/README.md).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_throughput.py [--steps 10 --warmup 2 --batch-size 4
        --max-len 256 --schedule sequential --threads <cores> --trl-optim adamw_torch --json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import (
    ADAM_BETAS,
    ADAM_EPS,
    MAX_GRAD_NORM,
    OFFLINE_ENV,
    StepStats,
    load_average,
    machine_description,
    markdown_table,
    paired_speedup,
    usable_cores,
)

IMPLS = ("plain", "trl", "chatrlhf", "chatrlhf-bf16")
MODEL = "smollm2-135m-instruct"

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


# ---- turn-taking between the worker processes -------------------------------------------------------
class Baton:
    """A worker's side of the turn-taking: ``start()`` before the first step, ``step_done()`` after each.

    Each step is timed from the "go" that starts it to its ``step_done()``; the parent sends "go" to one
    worker at a time and waits for its "done", so no two steps ever overlap.
    """

    def __init__(self, conn):
        self.conn = conn
        self.durations: list[float] = []
        self._started = None

    def _wait(self) -> None:
        msg = self.conn.recv()
        self._started = time.perf_counter() if msg == "go" else None  # else "finish": no more steps

    def start(self) -> None:
        if self._started is None and not self.durations:
            self.conn.send(("ready", None))
            self._wait()

    def step_done(self) -> None:
        self.durations.append(time.perf_counter() - self._started)
        self.conn.send(("done", None))
        # Block until the next turn (or "finish"), so nothing of this process overlaps another's step,
        # not even the end-of-training work (the chatrlhf stage's final eval and model save).
        self._wait()


# ---- the three implementations (each runs in its own worker process) ----------------------------------
def run_plain(args, workdir: Path, baton: Baton) -> dict:
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
    losses = []
    baton.start()
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
        baton.step_done()
    return {"mean_loss": sum(losses) / len(losses), "optimizer": "torch.optim.AdamW, default (for-loop) kernel"}


def run_trl(args, workdir: Path, baton: Baton) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatrlhf.models.loading import resolve_model

    class Turns(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            baton.start()

        def on_step_end(self, *a, **kw):  # after clip, optimizer step, LR step and zero_grad
            baton.step_done()

    path = resolve_model(MODEL)
    optim = {"optim": args.trl_optim} if args.trl_optim else {}
    config = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, max_grad_norm=MAX_GRAD_NORM, seed=args.seed,
        max_length=args.max_len, packing=False, padding_free=False,
        # The labels column already masks everything but assistant tokens (built by chatrlhf.data, the
        # same tensors the other two train on); TRL keeps a given "labels" column as is.
        completion_only_loss=False, assistant_only_loss=False,
        # TRL's defaults turn bf16 and activation checkpointing on (on CPU too). transformers 5 renamed
        # gradient_checkpointing to activation_checkpointing; the old name still works but warns.
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, **optim,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_read_items(workdir)),
                         processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Turns()])
    result = trainer.train()
    optim_name = getattr(config.optim, "value", config.optim)
    return {"mean_loss": result.training_loss, "optimizer": f"optim={optim_name} (SFTConfig.optim)"}


def run_chatrlhf(args, workdir: Path, baton: Baton, precision: str = "fp32") -> dict:
    from chatrlhf.config import DataConfig, EngineConfig, ModelConfig, RunConfig
    from chatrlhf.engine import Engine
    from chatrlhf.stages.sft import train_sft
    from chatrlhf.stages.sft_config import SFTConfig

    # The stage has no hooks, so the turns wrap the Engine it builds: the first forward waits for the
    # first turn, and every optimizer step ends a turn. The stage's code itself runs unchanged.
    forward, step = Engine.__call__, Engine.step

    def forward_in_turn(self, *a, **kw):
        baton.start()
        return forward(self, *a, **kw)

    def step_in_turn(self):
        applied = step(self)
        if applied:
            baton.step_done()
        return applied

    Engine.__call__, Engine.step = forward_in_turn, step_in_turn
    out = workdir / f"chatrlhf-{precision}"
    cfg = SFTConfig(
        model=ModelConfig(name_or_path=MODEL, dtype="float32"),
        data=DataConfig(datasets=[str(workdir / "records.jsonl")], data_split="1,0,0", eval_fraction=0.0,
                        eval_datasets=[str(workdir / "eval.jsonl")], max_len=args.max_len,
                        max_prompt_len=args.max_len // 2),
        engine=EngineConfig(micro_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=args.lr,
                            weight_decay=0.0, adam_betas=ADAM_BETAS, adam_eps=ADAM_EPS, lr_scheduler="constant",
                            warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, seed=args.seed),
        run=RunConfig(output_dir=str(out), overwrite=True, save_every=0, eval_every=0, log_every=1, progress=False,
                      precision=precision),
        epochs=1,
        max_steps=args.warmup + args.steps,
    )
    train_sft(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {"mean_loss": sum(losses) / len(losses), "optimizer": "Engine: torch.optim.AdamW, default kernel",
            "precision": precision}


def run_chatrlhf_bf16(args, workdir: Path, baton: Baton) -> dict:
    """chatrlhf in mixed precision (--run.precision bf16): fp32 master weights, bf16 autocast forwards."""
    return run_chatrlhf(args, workdir, baton, precision="bf16")


WORKERS = {"plain": run_plain, "trl": run_trl, "chatrlhf": run_chatrlhf, "chatrlhf-bf16": run_chatrlhf_bf16}


def worker(impl: str, workdir: Path, conn) -> None:
    """Entry point of a worker process (started with "spawn": a fresh interpreter)."""
    log = os.open(workdir / f"log-{impl}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)  # library chatter goes to the log, which the parent shows if the worker fails
    os.dup2(log, 2)
    try:
        import torch

        args = argparse.Namespace(**json.loads((workdir / "args.json").read_text()))
        torch.set_num_threads(args.threads)
        baton = Baton(conn)
        result = WORKERS[impl](args, workdir, baton)
        # A library that changed the thread count would skew the comparison: report it.
        conn.send(("result", {**result, "durations": baton.durations, "threads_after": torch.get_num_threads()}))
    except BaseException:
        traceback.print_exc()
        conn.send(("error", traceback.format_exc()))


# ---- orchestration and report -------------------------------------------------------------------------
class Workers:
    """The parent's side: starts one process per implementation and hands out the steps."""

    def __init__(self, workdir: Path):
        self.ctx = mp.get_context("spawn")
        self.workdir, self.conns, self.procs = workdir, {}, {}

    def spawn(self, impl: str) -> None:
        here, there = self.ctx.Pipe()
        self.procs[impl] = self.ctx.Process(target=worker, args=(impl, self.workdir, there), daemon=True)
        self.procs[impl].start()
        there.close()
        self.conns[impl] = here

    def expect(self, impl: str, kind: str):
        conn, proc = self.conns[impl], self.procs[impl]
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"{impl} worker exited (code {proc.exitcode}, e.g. killed for memory); "
                                   f"end of its log:\n{self._log_tail(impl)}")
        got, payload = conn.recv()
        if got == "error":
            raise RuntimeError(f"{impl} worker failed:\n{payload}\nend of its log:\n{self._log_tail(impl)}")
        if got != kind:
            raise RuntimeError(f"{impl} worker sent {got!r} where {kind!r} was expected")
        return payload

    def _log_tail(self, impl: str) -> str:
        return (self.workdir / f"log-{impl}.txt").read_text(errors="replace")[-3000:]

    def step(self, impl: str) -> None:
        self.conns[impl].send("go")
        self.expect(impl, "done")

    def finish(self, impl: str) -> dict:
        self.conns[impl].send("finish")
        result = self.expect(impl, "result")
        self.procs[impl].join()
        return result

    def sequential(self, impls: list[str], n_steps: int) -> dict[str, dict]:
        """One implementation at a time, alone on the machine: start, all its steps, finish, exit."""
        results = {}
        for impl in impls:
            self.spawn(impl)
            self.expect(impl, "ready")
            for _ in range(n_steps):
                self.step(impl)
            results[impl] = self.finish(impl)
            print(f"{impl}: done", file=sys.stderr, flush=True)
        return results

    def turns(self, impls: list[str], n_steps: int) -> dict[str, dict]:
        """All implementations resident; one step each in turn, the order rotating every round."""
        for impl in impls:
            self.spawn(impl)
        for impl in impls:
            self.expect(impl, "ready")
        for k in range(n_steps):
            for impl in impls[k % len(impls):] + impls[: k % len(impls)]:
                self.step(impl)
            print(f"step {k + 1}/{n_steps} done by all", file=sys.stderr, flush=True)
        # One at a time: end-of-training work (TRL's, the stage's final eval and save) must not overlap.
        return {impl: self.finish(impl) for impl in impls}


def report(results: dict[str, dict], args, data: dict) -> str:
    timed = {impl: r["durations"][args.warmup:] for impl, r in results.items()}
    tokens = args.batch_size * args.max_len

    def speedup(ref: str, impl: str) -> str:
        if ref not in timed:
            return "-"
        if args.schedule == "turns":  # steps k of all implementations ran back to back: pair them
            return f"{paired_speedup(timed[ref], timed[impl]):.2f}"
        return f"{statistics.median(timed[ref]) / statistics.median(timed[impl]):.2f}"

    rows = []
    for impl, times in timed.items():
        s = StepStats.of(times)
        rows.append([impl, f"{s.median:.3f}", f"{s.mean:.3f}", f"{s.minimum:.3f}", f"{s.stdev:.3f}",
                     f"{tokens / s.median:.1f}", f"{args.batch_size / s.median:.3f}", f"{tokens / s.minimum:.1f}",
                     speedup("plain", impl), speedup("trl", impl), f"{results[impl]['mean_loss']:.4f}"])
    headers = ["implementation", "step median (s)", "step mean (s)", "step min (s)", "step stdev (s)",
               "tokens/s", "samples/s", "tokens/s (best step)", "x plain", "x TRL", "mean loss"]
    notes = [f"- {impl}: {r['optimizer']}; torch threads after training: {r['threads_after']}"
             for impl, r in results.items()]
    return "\n".join([
        f"machine: {machine_description(args.threads)}",
        f"model {MODEL} fp32 | batch {args.batch_size} x {args.max_len} tokens (no padding; "
        f"{data['labelled_fraction']:.0%} of predicted tokens are assistant tokens) | {args.steps} timed steps "
        f"after {args.warmup} warm-up, schedule {args.schedule} | lr {args.lr} | load avg at end {load_average()}",
        "",
        markdown_table(headers, rows),
        "",
        "tokens/s and samples/s from the median step. x plain / x TRL: speed-up over that row (> 1 is faster), "
        + ("the median over rounds of the ratio of the step times in a round of turns." if args.schedule == "turns"
           else "the ratio of median step times."),
        *notes,
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, lazy init)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step (no accumulation)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (every sequence is this long)")
    p.add_argument("--lr", type=float, default=2e-5, help="constant learning rate, no warm-up")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads for every worker")
    p.add_argument("--schedule", choices=("sequential", "turns"), default="sequential",
                   help="sequential: one implementation after another, each alone; turns: all resident, "
                        "taking turns step by step (robust to a drifting machine; see bench/README.md)")
    p.add_argument("--trl-optim", default=None,
                   help="TRL's SFTConfig.optim (default: TRL's own, adamw_torch_fused; adamw_torch = the "
                        "torch.optim.AdamW kernel plain and chatrlhf use)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the raw per-step durations here")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_len < 64:  # below that the first user turn (with the default system prompt) fills it
        p.error(f"--max-len must be >= 64 so the first assistant turn starts within it, got {args.max_len}")
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Inherited by the workers: offline, and the same thread count for OpenMP/MKL as for torch.
    os.environ.update(OFFLINE_ENV, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        workdir = Path(tmp)
        (workdir / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "json"}))
        data = prepare_data(args, workdir)
        t0 = time.perf_counter()
        results = getattr(Workers(workdir), args.schedule)(impls, args.warmup + args.steps)
        print(f"all workers finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = report(results, args, data)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"report": text, "data": data, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
