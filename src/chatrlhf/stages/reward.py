"""Reward model (DeepSpeed-Chat step 2): pairwise Bradley-Terry, or a pointwise ratings classifier.

pairwise: each pair's chosen and rejected sequences go through the model in one batch; the score is
read at each sequence's last real token; loss = -log sigmoid(r_chosen - r_rejected) averaged over the
pairs of the whole optimizer step. Eval: pairwise accuracy, mean chosen / rejected scores, margin.
ratings (a classifier over the K rating levels): a K-way head read at the last real token, cross-entropy on the
rating level; the reward is the expected rating. Eval: accuracy, mean absolute error of the expectation.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import pairwise_loss, rating_loss
from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.data import PairCollator, RatingCollator, check_rating_levels, encode_records, prepare_records
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import RatingModel, RewardModel, apply_lora, load_tokenizer
from chatrlhf.precision import announce
from chatrlhf.resume import resume_step, save_resumable
from chatrlhf.stages.reward_config import RMConfig
from chatrlhf.training import (
    MODEL_SUBDIR,
    BatchPlan,
    MetricsLogger,
    micro_batches_of_step,
    prepare_output_dir,
    rank_batches,
    set_seed,
    total_steps,
    write_resolved_config,
)


def _pair_losses(engine, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (2P,)
    chosen, rejected = scores.float().split(batch["num_pairs"])  # (P,), (P,)
    return pairwise_loss(chosen, rejected), chosen, rejected


def _rating_losses(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, K)
    return rating_loss(logits, batch["levels"]), logits.float()


@torch.no_grad()
def evaluate(engine: Engine, data: list[dict], collate, batch_size: int, objective: str) -> dict[str, float]:
    """Exact sums over the eval split, sharded across ranks."""
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, count, hits, chosen|abs-err, rejected
    # Equal batch counts on every rank (the last padded): under ZeRO-3 each forward is a collective.
    for idx, real in rank_batches(len(data), engine.rank, engine.world_size, batch_size):
        batch = collate([data[i] for i in idx])
        if objective == "pairwise":
            loss, chosen, rejected = (t[:real] for t in _pair_losses(engine, batch))
            hits, first, second = (chosen > rejected).sum(), chosen.sum(), rejected.sum()
        else:
            loss, logits = (t[:real] for t in _rating_losses(engine, batch))
            probs = logits.softmax(-1)
            expected = (probs * torch.arange(probs.size(-1))).sum(-1)  # (B,) in level units
            hits = (logits.argmax(-1) == batch["levels"][:real]).sum()
            first, second = (expected - batch["levels"][:real]).abs().sum(), torch.zeros(())
        sums += torch.stack([loss.sum(), torch.tensor(float(loss.numel())), hits, first, second]).double()
    loss, n, hits, first, second = engine.all_reduce(sums).tolist()
    engine.train()
    n = max(n, 1.0)
    if objective == "pairwise":
        return {
            "loss": loss / n,
            "accuracy": hits / n,
            "chosen_score": first / n,
            "rejected_score": second / n,
            "margin": (first - second) / n,
            "pairs": int(n),
        }
    return {"loss": loss / n, "accuracy": hits / n, "mae": first / n, "examples": int(n)}


def _load_data(cfg: RMConfig, tokenizer, progress: bool):
    """(train items, eval items, collator): preference pairs, or rated answers checked against the levels."""
    kind = "preference" if cfg.objective == "pairwise" else "rating"
    train_records, eval_records = prepare_records(cfg.data, kind=kind, phase=cfg.phase)
    train = encode_records(train_records, kind, tokenizer, cfg.data, progress=progress)
    evals = encode_records(eval_records, kind, tokenizer, cfg.data, progress=False)
    if kind == "preference":
        return train, evals, PairCollator(pad_id=tokenizer.pad_token_id)
    check_rating_levels(train, cfg.num_levels)  # fail now, not at the batch that holds the bad score
    check_rating_levels(evals, cfg.num_levels)
    return train, evals, RatingCollator(pad_id=tokenizer.pad_token_id, num_levels=cfg.num_levels)


def _load_engine(cfg: RMConfig, n_steps: int) -> Engine:
    """The causal LM's trunk with a new scalar (pairwise) or ratings head, in its engine."""
    pairwise = cfg.objective == "pairwise"
    model_cls = RewardModel if pairwise else RatingModel
    extra = {} if pairwise else {"num_levels": cfg.num_levels}
    model = model_cls.from_causal_lm(
        cfg.model.name_or_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, **extra
    )  # the new head is drawn from the torch RNG seeded above
    model.packing = cfg.engine.packing
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, cfg.model)  # adapters on the trunk only; the new head trains in full
    engine = Engine(model, cfg.engine, total_steps=n_steps, precision=cfg.run.precision)
    if engine.is_rank_0:
        announce(engine.precision)
    return engine


def _batch_losses(engine: Engine, batch: dict, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example losses, correct pairs or predictions) of one micro-batch."""
    if objective == "pairwise":
        losses, chosen, rejected = _pair_losses(engine, batch)
        return losses, (chosen > rejected).sum()
    losses, logits = _rating_losses(engine, batch)
    return losses, (logits.argmax(-1) == batch["levels"]).sum()


def rm_step(engine: Engine, train: list[dict], collate, plan: BatchPlan, step: int,
            objective: str) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches; (mean loss, accuracy) over all processes."""
    stats = torch.zeros(2, dtype=torch.float64)  # loss sum, correct pairs / predictions
    for micro in micro_batches_of_step(engine, plan, step, train):
        losses, hits = _batch_losses(engine, collate([train[i] for i in micro]), objective)
        # Mean over the examples of the whole step; x world because DeepSpeed averages over ranks.
        engine.backward(losses.sum() * (engine.world_size / plan.global_batch))
        engine.step()
        stats += torch.stack([losses.detach().sum(), hits]).double()
    loss, acc = (engine.all_reduce(stats) / plan.global_batch).tolist()
    return loss, acc


def train_reward_model(cfg: RMConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    set_seed(cfg.engine.seed)

    # ---- data -----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    train, evals, collate = _load_data(cfg, tokenizer, progress=cfg.run.progress and rank == 0)

    # ---- model and engine -----------------------------------------------------------------------
    plan = BatchPlan(len(train), cfg.engine.micro_batch_size, cfg.engine.gradient_accumulation_steps, world, cfg.engine.seed)
    plan.check("rm")
    n_steps = total_steps(plan, cfg.epochs, cfg.max_steps)
    engine = _load_engine(cfg, n_steps)
    start = resume_step(out, engine, cfg.run, plan)
    logger = MetricsLogger(out, enabled=engine.is_rank_0, start=start)
    if engine.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"records": len(train), "eval_records": len(evals), "total_steps": n_steps}, "data")

    # ---- train ----------------------------------------------------------------------------------
    baseline = None  # the starting model's eval, for comparison with the final one
    if cfg.run.eval_at_start and start == 0:
        baseline = evaluate(engine, evals, collate, cfg.engine.micro_batch_size, cfg.objective)
        logger.log(0, baseline, "eval")
    bar = tqdm(total=n_steps, initial=start, desc="rm", disable=not (cfg.run.progress and engine.is_rank_0))
    for step in range(start, n_steps):
        loss, acc = rm_step(engine, train, collate, plan, step, cfg.objective)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}")
        if done % cfg.run.log_every == 0 or done == n_steps:
            logger.log(done, {"loss": loss, "accuracy": acc, "grad_norm": engine.grad_norm, "lr": engine.lr,
                              "skipped_steps": engine.skipped_steps})
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < n_steps:
            logger.log(done, evaluate(engine, evals, collate, cfg.engine.micro_batch_size, cfg.objective), "eval")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_steps:
            save_resumable(out, engine, done, cfg.run, plan)
    bar.close()

    # ---- evaluate and save ----------------------------------------------------------------------
    metrics = evaluate(engine, evals, collate, cfg.engine.micro_batch_size, cfg.objective)
    logger.log(n_steps, metrics, "eval")
    engine.save_hf(out / MODEL_SUBDIR, tokenizer)
    if engine.is_rank_0:
        write_json_atomic(
            out / "eval.json", {"stage": "rm", "objective": cfg.objective, "steps": n_steps, **metrics, "start": baseline,
                             "precision": engine.precision.summary()}
        )
    logger.close()
    return metrics
