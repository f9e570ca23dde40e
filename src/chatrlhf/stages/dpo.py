"""Direct preference optimisation (Rafailov et al. 2023), its IPO / cDPO variants and the reference-free SimPO
and ORPO, on preference pairs.

No reward model and no sampling. Per pair, the policy's summed answer log-probs of the chosen answer y_w
and the rejected answer y_l, against a frozen reference's, give
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); the loss picked by ``cfg.loss`` turns h
into one number per pair, averaged over the pairs of the whole optimizer step.

Loop: load (tokenizer, pairs, policy) -> reference log-probs of every pair, once, then the reference is
freed -> for each optimizer step: one policy forward per micro-batch over its (2B, T) chosen + rejected
rows -> loss -> backward -> step -> log / eval / checkpoint -> final eval -> save the HF model.
Every implementation detail, with its line here, is listed in docs/dpo.md.
"""

from __future__ import annotations

import gc
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import answer_mask
from chatrlhf.algorithms.preference import (
    LENGTH_NORMALISED_LOSSES,
    PREFERENCE_LOSSES,
    implicit_rewards,
    preference_logits,
)
from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.data import PairCollator, encode_records, prepare_records
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import apply_lora, disable_dropout, load_causal_lm, load_tokenizer
from chatrlhf.precision import announce
from chatrlhf.reference import REF_KEY, answer_log_probs, load_reference, precompute_reference
from chatrlhf.resume import resume_step, save_resumable
from chatrlhf.stages.dpo_config import DPOConfig
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


class PairTerms(NamedTuple):
    """One batch of P pairs: per-pair losses and the summed answer log-probs behind them, (P,) each."""

    losses: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


class _Collate:
    """``PairCollator`` plus the items' precomputed reference log-probs, as (2P,) in the rows' order."""

    def __init__(self, pad_id: int):
        self.pairs = PairCollator(pad_id=pad_id)

    def __call__(self, items: list[dict]) -> dict:
        batch = self.pairs(items)
        if REF_KEY in items[0]:
            ref = torch.tensor([item[REF_KEY] for item in items], dtype=torch.float32)  # (P, 2)
            batch[REF_KEY] = torch.cat([ref[:, 0], ref[:, 1]])  # (2P,): chosen first, like the rows
        return batch


def _pair_terms(policy, reference, batch: dict, cfg: DPOConfig, device: torch.device) -> PairTerms:
    logps = answer_log_probs(policy, batch, device, cfg.engine.packing)  # (2P,), with gradients when training
    if REF_KEY in batch:  # precomputed before training
        ref = batch[REF_KEY].to(device)
    elif reference is None:  # reference-free: log ref(y) taken as 0 for every answer
        ref = torch.zeros_like(logps)
    else:
        with torch.no_grad():
            ref = answer_log_probs(reference, batch, device, cfg.engine.packing)  # (2P,)
    if cfg.loss in LENGTH_NORMALISED_LOSSES:  # SimPO, ORPO: each answer's mean per-token log-prob, no reference
        tokens = answer_mask(batch["attention_mask"], batch["prompt_lens"]).sum(-1).clamp(min=1)  # (2P,)
        logps = logps / tokens.to(logps)
    chosen, rejected = logps.split(batch["num_pairs"])  # (P,), (P,)
    ref_chosen, ref_rejected = ref.split(batch["num_pairs"])
    if cfg.loss in LENGTH_NORMALISED_LOSSES:
        losses = LENGTH_NORMALISED_LOSSES[cfg.loss](chosen, rejected, cfg.beta, cfg.simpo_gamma)  # (P,)
    else:
        h = preference_logits(chosen, rejected, ref_chosen, ref_rejected)  # (P,)
        losses = PREFERENCE_LOSSES[cfg.loss](h, cfg.beta, cfg.label_smoothing)  # (P,)
    return PairTerms(losses, chosen, rejected, ref_chosen, ref_rejected)


def _sums(t: PairTerms, beta: float, keep: int | None = None) -> torch.Tensor:
    """(7,) float64 sums over the first ``keep`` (default: all) pairs of ``t``: loss, chosen / rejected reward,
    correct pairs, chosen / rejected log-prob, pairs. Summed, not averaged, so that micro-batches and processes
    add up exactly."""
    t = PairTerms(*(x[:keep] for x in t))
    r_w = implicit_rewards(t.chosen.detach(), t.ref_chosen, beta)  # (P,)
    r_l = implicit_rewards(t.rejected.detach(), t.ref_rejected, beta)
    parts = [t.losses.detach().sum(), r_w.sum(), r_l.sum(), (r_w > r_l).sum(), t.chosen.detach().sum(),
             t.rejected.detach().sum(), torch.tensor(float(t.losses.numel()))]
    return torch.stack([p.double().cpu() for p in parts])


def _summary(sums: torch.Tensor) -> dict[str, float]:
    loss, r_w, r_l, hits, lp_w, lp_l, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "rewards/chosen": r_w / n, "rewards/rejected": r_l / n,
            "rewards/margin": (r_w - r_l) / n, "rewards/accuracy": hits / n,
            "logps/chosen": lp_w / n, "logps/rejected": lp_l / n}


@torch.no_grad()
def evaluate(engine: Engine, reference, data: list[dict], collate, batch_size: int, cfg: DPOConfig) -> dict:
    """The DPO loss and implicit-reward statistics over ``data``, sharded across ranks and summed exactly."""
    engine.eval()
    sums = torch.zeros(7, dtype=torch.float64)
    for idx, real in rank_batches(len(data), engine.rank, engine.world_size, batch_size):
        terms = _pair_terms(engine, reference, collate([data[i] for i in idx]), cfg, engine.device)
        sums += _sums(terms, cfg.beta, keep=real)
    sums = engine.all_reduce(sums.to(engine.device)).cpu()
    engine.train()
    return {**_summary(sums), "pairs": int(sums[-1].item())}


def _prepare_reference(cfg: DPOConfig, engine: Engine, start: int, splits: list[tuple[str, list[dict]]], collate):
    """The reference for per-step scoring, or None: reference-free, or its log-probs are now stored in the
    items of every split (``precompute_reference``) and the reference itself is freed."""
    if cfg.reference_free or cfg.loss in LENGTH_NORMALISED_LOSSES:
        return None
    # Before the first update the policy *is* the reference (unless another one is named): score with it and
    # load no second copy. On resume the policy has moved, so the reference is loaded again; its log-probs are
    # deterministic, so a resumed run sees exactly the values of the first one.
    reuse_policy = cfg.precompute_reference and start == 0 and cfg.reference is None
    reference = engine if reuse_policy else load_reference(cfg.reference or cfg.model.name_or_path, cfg.model,
                                                           cfg.disable_dropout, engine.device)
    if not cfg.precompute_reference:
        return reference
    engine.eval()
    for name, items in splits:
        precompute_reference(reference, items, collate, cfg.engine.micro_batch_size, engine,
                             progress=cfg.run.progress and engine.is_rank_0, desc=f"reference ({name})",
                             packing=cfg.engine.packing)
    engine.train()
    del reference
    gc.collect()
    return None


def _load_policy(cfg: DPOConfig, n_steps: int) -> Engine:
    """The policy to train (with LoRA adapters when ``--model.lora_r`` > 0) in its engine."""
    m = cfg.model
    model = apply_lora(load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                      gradient_checkpointing=m.gradient_checkpointing), m)
    if cfg.disable_dropout:
        disable_dropout(model)  # otherwise the policy's log-probs are noisy and h != 0 at step 0
    engine = Engine(model, cfg.engine, total_steps=n_steps, precision=cfg.run.precision)
    if engine.is_rank_0:
        announce(engine.precision)
    return engine


def dpo_step(engine: Engine, reference, train: list[dict], collate, plan: BatchPlan, step: int,
             cfg: DPOConfig) -> dict[str, float]:
    """One optimizer step over this process's micro-batches of the step's pairs; returns the step's loss,
    reward margins and accuracy over the pairs of all processes."""
    sums = torch.zeros(7, dtype=torch.float64)
    for micro in micro_batches_of_step(engine, plan, step, train):
        terms = _pair_terms(engine, reference, collate([train[i] for i in micro]), cfg, engine.device)
        # Mean over the pairs of the whole step; x world because DeepSpeed averages gradients over ranks.
        engine.backward(terms.losses.sum() * (engine.world_size / plan.global_batch))
        engine.step()
        sums += _sums(terms, cfg.beta)
    return _summary(engine.all_reduce(sums.to(engine.device)).cpu())


def train_dpo(cfg: DPOConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    set_seed(cfg.engine.seed)

    # ---- data -----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    train_records, eval_records = prepare_records(cfg.data, kind="preference", phase=cfg.phase)
    train = encode_records(train_records, "preference", tokenizer, cfg.data, progress=cfg.run.progress and rank == 0)
    evals = encode_records(eval_records, "preference", tokenizer, cfg.data, progress=False)
    collate = _Collate(tokenizer.pad_token_id)
    batch_size = cfg.engine.micro_batch_size

    # ---- policy and engine ----------------------------------------------------------------------
    plan = BatchPlan(len(train), batch_size, cfg.engine.gradient_accumulation_steps, world, cfg.engine.seed)
    plan.check("dpo")
    n_steps = total_steps(plan, cfg.epochs, cfg.max_steps)
    engine = _load_policy(cfg, n_steps)
    start = resume_step(out, engine, cfg.run, plan)
    logger = MetricsLogger(out, enabled=engine.is_rank_0, start=start)
    if engine.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"records": len(train), "eval_records": len(evals), "total_steps": n_steps}, "data")

    # ---- reference: precomputed once (then freed), per micro-batch, or none ---------------------
    reference = _prepare_reference(cfg, engine, start, [("train", train), ("eval", evals)], collate)

    # ---- train ----------------------------------------------------------------------------------
    baseline = None  # the starting model's eval, for comparison with the final one
    if cfg.run.eval_at_start and start == 0:
        baseline = evaluate(engine, reference, evals, collate, batch_size, cfg)
        logger.log(0, baseline, "eval")
    bar = tqdm(total=n_steps, initial=start, desc="dpo", disable=not (cfg.run.progress and engine.is_rank_0))
    for step in range(start, n_steps):
        epoch = step // plan.steps_per_epoch
        row = dpo_step(engine, reference, train, collate, plan, step, cfg)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}")
        if done % cfg.run.log_every == 0 or done == n_steps:
            logger.log(done, {**row, "grad_norm": engine.grad_norm, "lr": engine.lr, "epoch": epoch,
                              "skipped_steps": engine.skipped_steps})
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < n_steps:
            logger.log(done, evaluate(engine, reference, evals, collate, batch_size, cfg), "eval")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_steps:
            save_resumable(out, engine, done, cfg.run, plan)
    bar.close()

    # ---- evaluate and save ----------------------------------------------------------------------
    metrics = evaluate(engine, reference, evals, collate, batch_size, cfg)
    logger.log(n_steps, metrics, "eval")
    engine.save_hf(out / MODEL_SUBDIR, tokenizer)
    if engine.is_rank_0:
        write_json_atomic(out / "eval.json", {"stage": "dpo", "objective": cfg.loss, "beta": cfg.beta,
                                              "steps": n_steps, **metrics, "start": baseline,
                                              "precision": engine.precision.summary()})
    logger.close()
    return metrics
