"""Per-step overhead of chatrlhf.engine.Engine (DeepSpeed, stage 0, 1 process) over a plain PyTorch loop.

Both loops do the same work per optimizer step: forward, backward, global-norm clip, AdamW (decay on
>= 2-D tensors only), LambdaLR step, gradients set to None. Repeats alternate plain/engine so slow drifts
of a shared machine hit both; we report the ratio of the best repeats and the median of the paired (neighbouring) ratios.

    .venv/bin/python bench/engine_overhead.py [--steps 10 --repeats 12 --hidden 256 --layers 4 --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import time

import torch


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def loss_fn(model_or_engine, ids: torch.Tensor) -> torch.Tensor:
    logits = model_or_engine(input_ids=ids).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class PlainLoop:
    """The reference: what a hand-written single-process PyTorch loop does."""

    def __init__(self, model, cfg, total_steps: int):
        from chatrlhf.engine import lr_factor
        from chatrlhf.engine.optim import param_groups

        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
        )
        schedule = functools.partial(
            lr_factor, warmup=cfg.warmup_steps, total=total_steps, kind=cfg.lr_scheduler
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)

    def step(self, ids: torch.Tensor) -> float:
        loss = loss_fn(self.model, ids)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.max_grad_norm, norm)
        float(norm)  # the engine reads the norm every step (for logging and the NaN guard)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class EngineLoop:
    def __init__(self, model, cfg, total_steps: int):
        from chatrlhf.engine import Engine

        self.engine = Engine(model, cfg, total_steps=total_steps)

    def step(self, ids: torch.Tensor) -> float:
        loss = loss_fn(self.engine, ids)
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


def time_steps(loop, data: list[torch.Tensor], steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        loop.step(data[i % len(data)])
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the repeats")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: stable timings on a shared machine)",
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from chatrlhf.config import EngineConfig

    cfg = EngineConfig(learning_rate=1e-4, weight_decay=0.01, warmup_steps=2, micro_batch_size=args.batch)
    total = args.warmup + args.steps * args.repeats
    base = build_model(args.hidden, args.layers, args.vocab)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]
    loops = {
        "plain": PlainLoop(copy.deepcopy(base), cfg, total),
        "engine": EngineLoop(copy.deepcopy(base), cfg, total),
    }
    for loop in loops.values():
        time_steps(loop, data, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(loops)[::-1]  # neither always runs first
        for name in order:
            times[name].append(time_steps(loops[name], data, args.steps))

    import deepspeed

    # Paired ratios: each engine repeat against the plain repeat next to it, so slow drifts of a
    # shared machine cancel; the minimum of each is the least-disturbed figure.
    ratios = [e / p for e, p in zip(times["engine"], times["plain"])]
    plain, engine = min(times["plain"]), min(times["engine"])
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "load_avg_1m": os.getloadavg()[0],
        },
        "model": {
            "params": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
        },
        "plain_ms_per_step": [round(t * 1e3, 2) for t in times["plain"]],
        "engine_ms_per_step": [round(t * 1e3, 2) for t in times["engine"]],
        "plain_min_ms": round(plain * 1e3, 2),
        "engine_min_ms": round(engine * 1e3, 2),
        "ratio_of_minimums": round(engine / plain, 4),
        "median_paired_ratio": round(statistics.median(ratios), 4),
    }
    print(json.dumps(result, indent=2))
    print(
        f"plain {plain * 1e3:.1f} ms/step, engine {engine * 1e3:.1f} ms/step (best repeats): ratio "
        f"{engine / plain:.3f}; median paired ratio {statistics.median(ratios):.3f} "
        f"({os.cpu_count()} CPUs, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"{n_params / 1e6:.2f} M params, load avg {os.getloadavg()[0]:.1f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
