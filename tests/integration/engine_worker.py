"""Data-parallel check of chatrlhf.engine, started by tests/integration/test_engine.py through the real launcher:

    deepspeed --num_gpus 2 tests/integration/engine_worker.py --model DIR --out DIR --stage 2 --steps 4

Every rank trains on its slice of the same global batches; rank 0 writes ``OUT/result.json`` (losses,
grad norms, an all_reduce check) and all ranks save and reload a checkpoint under ``OUT/ckpt``.
The data and the loss live here so the test computes its 1-process reference with the same code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

GLOBAL_BATCH = 4
SEQ_LEN = 12


def make_batches(vocab_size: int, n_batches: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed random token batches with right padding of varying length, so token counts differ per row."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen)  # (B, T)
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (GLOBAL_BATCH,), generator=gen)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()  # (B, T)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def token_nll_sum(engine, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over real (attention_mask == 1) targets, and their count."""
    logits = engine(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits  # (B, T, V)
    targets = rows["input_ids"][:, 1:]
    valid = rows["attention_mask"][:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none"
    )  # (B, T-1)
    return (nll * valid).sum(), valid.sum()


def train_steps(
    engine, batches, steps: int, micro_batch_size: int, start: int = 0
) -> tuple[list[float], list[float]]:
    """Optimizer steps ``start .. start+steps-1`` (step i uses ``batches[i % len(batches)]``); each rank
    takes its rows of the global batch in micro-batches. The loss of a step is normalised by the token
    count of the whole global batch (what the stages do)."""
    losses, norms = [], []
    per_rank = GLOBAL_BATCH // engine.world_size
    for step in range(start, start + steps):
        batch = batches[step % len(batches)]
        n_tokens = batch["attention_mask"][:, 1:].sum()
        local_sum = torch.zeros(())
        start = engine.rank * per_rank
        for i in range(start, start + per_rank, micro_batch_size):
            rows = {k: v[i : i + micro_batch_size] for k, v in batch.items()}
            nll_sum, _ = token_nll_sum(engine, rows)
            # x world_size: the engine averages gradients over processes, we want their sum / n_tokens
            engine.backward(nll_sum * engine.world_size / n_tokens)
            local_sum += nll_sum.detach()
            engine.step()
        losses.append(float(engine.all_reduce(local_sum) / n_tokens))
        norms.append(engine.grad_norm)
    return losses, norms


def param_checksum(engine) -> float:
    with engine.gathered_parameters():
        return float(sum(p.double().square().sum() for p in engine.module.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--load-stage0", default="", help="a 1-process stage-0 checkpoint to load as well")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from chatrlhf.config import EngineConfig
    from chatrlhf.engine import Engine, init_distributed, shutdown_distributed
    from chatrlhf.engine.state import load_engines, save_engines

    rank, world = init_distributed()
    cfg = EngineConfig(
        zero_stage=args.stage,
        micro_batch_size=GLOBAL_BATCH // world,
        learning_rate=3e-3,
        warmup_steps=1,
        weight_decay=0.01,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    engine = Engine(model, cfg, total_steps=args.steps)
    batches = make_batches(model.config.vocab_size)
    losses, norms = train_steps(engine, batches, args.steps, cfg.micro_batch_size)
    ranks_sum = float(engine.all_reduce(torch.tensor(float(rank + 1))))

    out = Path(args.out)
    ckpt_dir = save_engines(out / "ckpt", args.steps, engine, keep_last=1)
    with engine.gathered_parameters():
        before = [p.detach().clone() for p in engine.module.parameters()]
    load_engines(ckpt_dir, engine)
    with engine.gathered_parameters():
        reload_equal = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    result = {
        "world_size": world,
        "losses": losses,
        "grad_norms": norms,
        "all_reduce_sum": ranks_sum,
        "reload_equal": reload_equal,
    }
    if args.load_stage0:  # stage-0 state is not partitioned: it must load with any number of processes
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        plain = Engine(model, EngineConfig(micro_batch_size=GLOBAL_BATCH // world), total_steps=args.steps)
        load_engines(args.load_stage0, plain)
        result["stage0_checksum"] = param_checksum(plain)
        result["stage0_optimizer_steps"] = plain.optimizer_steps
    # The consolidated HF save (ZeRO-3 gathers the shards) loads in plain transformers with the same logits.
    probe = batches[0]
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    engine.save_hf(out / "hf")
    if engine.is_rank_0:
        reloaded = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
        with torch.no_grad():
            again = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        result["hf_logits_max_diff"] = float((again - logits).abs().max())
    if engine.is_rank_0:
        (out / "result.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
