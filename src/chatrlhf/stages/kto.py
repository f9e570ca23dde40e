"""KTO (Kahneman-Tversky optimisation, Ethayarajh et al. 2024) on unpaired answers, each labelled desirable or
undesirable: what thumbs and 1-5 ratings give, with no pairing.

Per answer y to prompt x, r = log pi(y|x) - log ref(y|x) is compared with a reference point z0, the policy's
KL to the reference estimated on mismatched pairs (x with another example's answer y'): desirable answers are
pushed above z0, undesirable ones below it (``chatrlhf.algorithms.preference.kto``).

z0 is estimated over the whole optimizer step, every micro-batch and process, so micro-batch x accumulation
gives the same step as one full batch (TRL estimates it per micro-batch). Each answer's mismatched row is
fixed once (its prompt with the next answer of a seeded cycle over the data), so the reference's log-probs
of both rows are computed once before training, and the reference is freed.

Loop: load (tokenizer, answers, policy) -> mismatched rows -> reference log-probs, once -> for each optimizer
step: z0 from a no-grad policy forward over the step's mismatched rows -> one policy forward per micro-batch
over its answers -> loss -> backward -> step -> log / eval / checkpoint -> final eval -> save the HF model.
"""

from __future__ import annotations

import gc
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms.preference import implicit_rewards, kto, kto_reference_point
from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.data import DataError, encode_records, pad_sequences, prepare_records
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import apply_lora, disable_dropout, load_causal_lm, load_tokenizer
from chatrlhf.precision import announce
from chatrlhf.reference import REF_KEY, answer_log_probs, load_reference, precompute_reference
from chatrlhf.resume import resume_step, save_resumable
from chatrlhf.stages.kto_config import KTOConfig
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

KL_KEY = "kl_input_ids"  # an item's mismatched row: its prompt, then another item's answer


class Terms(NamedTuple):
    """One micro-batch of P answers, (P,) each."""

    losses: torch.Tensor
    log_probs: torch.Tensor  # log pi(y|x), summed over the answer
    log_ratios: torch.Tensor  # log pi(y|x) - log ref(y|x)
    desirable: torch.Tensor  # bool


def attach_kl_rows(items: list[dict], max_len: int, seed: int) -> None:
    """Gives each item its mismatched row: its prompt followed by the answer of the item after it in a seeded
    cycle through all items (each answer is used once), cut to ``max_len`` tokens."""
    if len(items) < 2:
        raise DataError(f"has {len(items)} answer: KTO's KL estimate pairs each prompt with another example's "
                        "answer.", "give at least 2 answers (and many more to learn anything).")
    order = np.random.default_rng([seed, 2]).permutation(len(items)).tolist()
    for k, i in enumerate(order):
        mine, other = items[i], items[order[(k + 1) % len(order)]]
        items[i][KL_KEY] = (mine["input_ids"][: mine["prompt_len"]] + other["input_ids"][other["prompt_len"] :])[:max_len]


class Collate:
    """Answers then their mismatched rows as one (2P, T) right-padded batch (the layout ``precompute_reference``
    scores), plus ``desirable`` (P,) and the items' reference log-probs (2P,) when stored."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = pad_sequences([it["input_ids"] for it in items] + [it[KL_KEY] for it in items], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "num_pairs": len(items),
                 "prompt_lens": torch.tensor([it["prompt_len"] for it in items] * 2, dtype=torch.long),
                 "desirable": torch.tensor([it["label"] for it in items], dtype=torch.bool)}
        if REF_KEY in items[0]:
            ref = torch.tensor([it[REF_KEY] for it in items], dtype=torch.float32)  # (P, 2)
            batch[REF_KEY] = torch.cat([ref[:, 0], ref[:, 1]])  # (2P,) like the rows
        return batch


def _block(batch: dict, second: bool) -> dict:
    """The answers' rows (or, with ``second``, the mismatched rows), trimmed to their own longest row."""
    p = batch["num_pairs"]
    rows = slice(p, 2 * p) if second else slice(0, p)
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(-1).max())
    return {"input_ids": batch["input_ids"][rows, :width], "attention_mask": mask[:, :width],
            "prompt_lens": batch["prompt_lens"][rows]}


@torch.no_grad()
def reference_point(engine: Engine, batches: list[tuple[dict, int]]) -> torch.Tensor:
    """z0 over the first ``keep`` items of each batch on every process: the mean of log pi - log ref on the
    mismatched rows, clamped at 0."""
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # [sum of log-ratios, rows]
    for batch, keep in batches:
        logps = answer_log_probs(engine, _block(batch, second=True), engine.device, engine.cfg.packing)  # (P,)
        ratios = (logps - batch[REF_KEY][batch["num_pairs"] :].to(logps))[:keep]
        sums += torch.stack([ratios.double().sum(), torch.tensor(float(ratios.numel()), device=engine.device)])
    sums = engine.all_reduce(sums)
    return kto_reference_point(sums[0], sums[1]).float()


def _terms(policy, batch: dict, z0: torch.Tensor, cfg: KTOConfig, device: torch.device) -> Terms:
    logps = answer_log_probs(policy, _block(batch, second=False), device, cfg.engine.packing)  # (P,), with grads
    ratios = logps - batch[REF_KEY][: batch["num_pairs"]].to(device)
    desirable = batch["desirable"].to(device)
    losses = kto(ratios, desirable, z0.to(logps), cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    return Terms(losses, logps, ratios, desirable)


def _sums(t: Terms, beta: float, keep: int | None = None) -> torch.Tensor:
    """(8,) float64 sums over the first ``keep`` answers: loss; reward, count and log-prob of the desirable and
    of the undesirable answers; answers. Sums, so that micro-batches and processes add up exactly."""
    t = Terms(*(x[:keep] for x in t))
    rewards = implicit_rewards(t.log_ratios.detach(), 0.0, beta)
    good, bad = t.desirable, ~t.desirable
    parts = [t.losses.detach().sum(), rewards[good].sum(), good.sum(), t.log_probs.detach()[good].sum(),
             rewards[bad].sum(), bad.sum(), t.log_probs.detach()[bad].sum(), torch.tensor(float(len(t.losses)))]
    return torch.stack([x.double().cpu() for x in parts])


def _summary(sums: torch.Tensor, z0: torch.Tensor) -> dict[str, float]:
    loss, r_good, n_good, lp_good, r_bad, n_bad, lp_bad, n = sums.tolist()
    r_good, r_bad = r_good / max(n_good, 1.0), r_bad / max(n_bad, 1.0)
    return {"loss": loss / max(n, 1.0), "kl": z0.item(), "rewards/desirable": r_good, "rewards/undesirable": r_bad,
            "rewards/margin": r_good - r_bad, "logps/desirable": lp_good / max(n_good, 1.0),
            "logps/undesirable": lp_bad / max(n_bad, 1.0), "desirable_frac": n_good / max(n, 1.0)}


@torch.no_grad()
def evaluate(engine: Engine, data: list[dict], collate: Collate, batch_size: int, cfg: KTOConfig) -> dict:
    """The KTO loss (with z0 over the whole set) and reward statistics over ``data``, summed exactly over ranks."""
    engine.eval()
    batches = [(collate([data[i] for i in idx]), real)
               for idx, real in rank_batches(len(data), engine.rank, engine.world_size, batch_size)]
    z0 = reference_point(engine, batches)
    sums = torch.zeros(8, dtype=torch.float64)
    for batch, real in batches:
        sums += _sums(_terms(engine, batch, z0, cfg, engine.device), cfg.beta, keep=real)
    sums = engine.all_reduce(sums.to(engine.device)).cpu()
    engine.train()
    return {**_summary(sums, z0), "answers": int(sums[-1].item())}


def kto_step(engine: Engine, train: list[dict], collate: Collate, plan: BatchPlan, step: int,
             cfg: KTOConfig) -> dict[str, float]:
    """One optimizer step over this process's micro-batches of the step's answers; returns the step's loss and
    reward statistics over the answers of all processes."""
    batches = [(collate([train[i] for i in micro]), len(micro))
               for micro in micro_batches_of_step(engine, plan, step, train)]
    z0 = reference_point(engine, batches)  # one value for the whole step, on every process
    sums = torch.zeros(8, dtype=torch.float64)
    for batch, _ in batches:
        terms = _terms(engine, batch, z0, cfg, engine.device)
        # Mean over the answers of the whole step; x world because DeepSpeed averages gradients over ranks.
        engine.backward(terms.losses.sum() * (engine.world_size / plan.global_batch))
        engine.step()
        sums += _sums(terms, cfg.beta)
    return _summary(engine.all_reduce(sums.to(engine.device)).cpu(), z0)


def _load_policy(cfg: KTOConfig, n_steps: int) -> Engine:
    m = cfg.model
    model = apply_lora(load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                      gradient_checkpointing=m.gradient_checkpointing), m)
    if cfg.disable_dropout:
        disable_dropout(model)
    engine = Engine(model, cfg.engine, total_steps=n_steps, precision=cfg.run.precision)
    if engine.is_rank_0:
        announce(engine.precision)
    return engine


def _score_reference(cfg: KTOConfig, engine: Engine, start: int, splits: list[tuple[str, list[dict]]],
                     collate: Collate) -> None:
    """Stores the reference's log-probs in every item. Before the first update the policy *is* the reference
    (unless another is named), so no second copy is loaded; on resume the starting model is loaded again, and
    its log-probs are deterministic, so a resumed run sees exactly the values of the first one."""
    reuse_policy = start == 0 and cfg.reference is None
    reference = engine if reuse_policy else load_reference(cfg.reference or cfg.model.name_or_path, cfg.model,
                                                           cfg.disable_dropout, engine.device)
    engine.eval()
    for name, items in splits:
        precompute_reference(reference, items, collate, cfg.engine.micro_batch_size, engine,
                             progress=cfg.run.progress and engine.is_rank_0, desc=f"reference ({name})",
                             packing=cfg.engine.packing)
    engine.train()
    del reference
    gc.collect()


def _encode(cfg: KTOConfig, tokenizer, progress: bool) -> tuple[list[dict], list[dict]]:
    train_records, eval_records = prepare_records(cfg.data, kind="unpaired", phase=cfg.phase)
    train = encode_records(train_records, "unpaired", tokenizer, cfg.data, progress=progress)
    evals = encode_records(eval_records, "unpaired", tokenizer, cfg.data, progress=False)
    for items in (train, evals):
        if items:
            attach_kl_rows(items, cfg.data.max_len, cfg.engine.seed)
    return train, evals


def train_kto(cfg: KTOConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    set_seed(cfg.engine.seed)

    # ---- data: answers, each with its mismatched row --------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    train, evals = _encode(cfg, tokenizer, progress=cfg.run.progress and rank == 0)
    collate, batch_size = Collate(tokenizer.pad_token_id), cfg.engine.micro_batch_size

    # ---- policy, engine, reference log-probs ----------------------------------------------------
    plan = BatchPlan(len(train), batch_size, cfg.engine.gradient_accumulation_steps, world, cfg.engine.seed)
    plan.check("kto")
    n_steps = total_steps(plan, cfg.epochs, cfg.max_steps)
    engine = _load_policy(cfg, n_steps)
    start = resume_step(out, engine, cfg.run, plan)
    logger = MetricsLogger(out, enabled=engine.is_rank_0, start=start)
    if engine.is_rank_0:
        write_resolved_config(out, cfg)
        good = sum(it["label"] for it in train)
        logger.log(start, {"records": len(train), "eval_records": len(evals), "total_steps": n_steps,
                           "desirable": good, "undesirable": len(train) - good}, "data")
    _score_reference(cfg, engine, start, [("train", train), ("eval", evals)], collate)

    # ---- train ----------------------------------------------------------------------------------
    baseline = None
    if cfg.run.eval_at_start and start == 0 and evals:
        baseline = evaluate(engine, evals, collate, batch_size, cfg)
        logger.log(0, baseline, "eval")
    bar = tqdm(total=n_steps, initial=start, desc="kto", disable=not (cfg.run.progress and engine.is_rank_0))
    for step in range(start, n_steps):
        row = kto_step(engine, train, collate, plan, step, cfg)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margin']:.3f}")
        if done % cfg.run.log_every == 0 or done == n_steps:
            logger.log(done, {**row, "grad_norm": engine.grad_norm, "lr": engine.lr,
                              "epoch": step // plan.steps_per_epoch, "skipped_steps": engine.skipped_steps})
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < n_steps and evals:
            logger.log(done, evaluate(engine, evals, collate, batch_size, cfg), "eval")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_steps:
            save_resumable(out, engine, done, cfg.run, plan)
    bar.close()

    # ---- evaluate and save ----------------------------------------------------------------------
    metrics = evaluate(engine, evals, collate, batch_size, cfg) if evals else {}
    if metrics:
        logger.log(n_steps, metrics, "eval")
    engine.save_hf(out / MODEL_SUBDIR, tokenizer)
    if engine.is_rank_0:
        write_json_atomic(out / "eval.json", {"stage": "kto", "beta": cfg.beta, "steps": n_steps, **metrics,
                                              "start": baseline, "precision": engine.precision.summary()})
    logger.close()
    return metrics
