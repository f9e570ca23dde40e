"""Supervised fine-tuning (DeepSpeed-Chat step 1): next-token loss on assistant tokens only.

Loop: load (tokenizer, records, model) -> for each optimizer step: micro-batches forward/backward with
the loss normalised by the labelled tokens of the whole step -> step -> log / eval / checkpoint ->
final perplexity on the eval split -> save the HF model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chatrlhf.algorithms import IGNORE_INDEX, position_ids_from_mask, token_nll
from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.data import SFTCollator, encode_records, prepare_records
from chatrlhf.data.packing import pack_labels, packed_inputs, plan_packing
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import apply_lora, load_causal_lm, load_tokenizer, uses_flash_attention
from chatrlhf.models.lm_head import logits_at
from chatrlhf.precision import announce
from chatrlhf.resume import resume_step, save_resumable
from chatrlhf.stages.sft_config import SFTConfig
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


def forward_nll(engine, batch, packing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and its mask: (B, T-1) each, or over the packed rows, (K, L-1), with ``packing``."""
    mask, labels = batch["attention_mask"], batch["labels"]
    if not packing:
        logits = engine(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits  # (B, T, V)
        return token_nll(logits, labels)
    plan = plan_packing(mask)
    inputs = packed_inputs(plan, batch["input_ids"], pad_id=0, flash=uses_flash_attention(engine))
    targets = pack_labels(plan, labels, IGNORE_INDEX)[:, 1:]  # (K, L-1): what position t predicts
    scored = targets != IGNORE_INDEX
    logits = logits_at(engine, inputs, F.pad(scored, (0, 1)))  # (N, V): the LM head on scored positions only
    nll = F.cross_entropy(logits.float(), targets[scored].to(logits.device), reduction="none")
    return torch.zeros(scored.shape, device=nll.device).masked_scatter(scored.to(nll.device), nll), scored.float()


def _labelled(example) -> int:
    # Tokens predicted: every label except the first position (nothing predicts it) and IGNORE_INDEX.
    return sum(1 for t in example["labels"][1:] if t != -100)


@torch.no_grad()
def evaluate(engine: Engine, data: list[dict], collate, batch_size: int, packing: bool = False) -> dict[str, float]:
    """Token-level NLL and perplexity over ``data``, sharded across ranks and summed exactly."""
    engine.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    # Equal batch counts on every rank (the last padded): under ZeRO-3 each forward is a collective.
    for idx, real in rank_batches(len(data), engine.rank, engine.world_size, batch_size):
        batch = collate([data[i] for i in idx])
        batch["labels"][real:] = IGNORE_INDEX  # a repeated item fills the batch only to keep ranks in step
        nll, mask = forward_nll(engine, batch, packing)
        nll_sum += nll.sum().double()
        tokens += mask.sum().double()
    nll_sum, tokens = engine.all_reduce(nll_sum), engine.all_reduce(tokens)
    engine.train()
    loss = (nll_sum / tokens.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens.item())}


def _load_engine(cfg: SFTConfig, n_steps: int) -> Engine:
    """The causal LM to fine-tune (with LoRA adapters when ``--model.lora_r`` > 0) in its engine."""
    model = load_causal_lm(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    model = apply_lora(model, cfg.model)  # --model.lora_r 0 (the default): full fine-tuning, model unchanged
    engine = Engine(model, cfg.engine, total_steps=n_steps, precision=cfg.run.precision)
    if engine.is_rank_0:
        announce(engine.precision)
    return engine


def sft_step(engine: Engine, train: list[dict], collate, plan: BatchPlan, step: int,
             packing: bool = False) -> dict[str, float]:
    """One optimizer step over this process's micro-batches of the step's batch; returns the mean NLL per
    labelled token of the whole batch (all processes), the share of the forwards' positions that were
    padding (``pad_frac``) and the micro-batches each process ran."""
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    global_idx = plan.batch(epoch, in_epoch)
    n_tokens = max(1, sum(_labelled(train[i]) for i in global_idx))
    sums = torch.zeros(3, dtype=torch.float64)  # NLL, real tokens, positions run
    micro_batches = micro_batches_of_step(engine, plan, step, train)
    for micro in micro_batches:
        batch = collate([train[i] for i in micro])
        nll, _ = forward_nll(engine, batch, packing)
        # Sum over tokens / tokens in the whole step: accumulation and ranks add up to the full-batch
        # mean exactly. x world because DeepSpeed averages gradients over ranks.
        engine.backward(nll.sum() * (engine.world_size / n_tokens))
        engine.step()
        sums += torch.tensor([nll.detach().sum().item(), batch["attention_mask"].sum().item(),
                              nll.shape[0] * (nll.shape[1] + 1)], dtype=torch.float64)
    nll_sum, real, positions = engine.all_reduce(sums).tolist()
    return {"loss": nll_sum / n_tokens, "pad_frac": 1 - real / max(positions, 1), "micro_batches": len(micro_batches)}


def train_sft(cfg: SFTConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    set_seed(cfg.engine.seed)

    # ---- data -----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    train_records, eval_records = prepare_records(cfg.data, kind="sft", phase=cfg.phase)
    train = encode_records(train_records, "sft", tokenizer, cfg.data, progress=cfg.run.progress and rank == 0)
    evals = encode_records(eval_records, "sft", tokenizer, cfg.data, progress=False)
    collate = SFTCollator(pad_id=tokenizer.pad_token_id)

    # ---- model and engine -----------------------------------------------------------------------
    plan = BatchPlan(len(train), cfg.engine.micro_batch_size, cfg.engine.gradient_accumulation_steps, world, cfg.engine.seed)
    plan.check("sft")
    n_steps = total_steps(plan, cfg.epochs, cfg.max_steps)
    engine = _load_engine(cfg, n_steps)
    start = resume_step(out, engine, cfg.run, plan)
    logger = MetricsLogger(out, enabled=engine.is_rank_0, start=start)
    if engine.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"records": len(train), "eval_records": len(evals), "total_steps": n_steps}, "data")

    # ---- train ----------------------------------------------------------------------------------
    baseline = None  # the starting model's eval, for comparison with the final one
    if cfg.run.eval_at_start and start == 0 and evals:
        baseline = evaluate(engine, evals, collate, cfg.engine.micro_batch_size, cfg.engine.packing)
        logger.log(0, baseline, "eval")
    loss = None  # the last step's, when resumed at the end
    bar = tqdm(total=n_steps, initial=start, desc="sft", disable=not (cfg.run.progress and engine.is_rank_0))
    for step in range(start, n_steps):
        epoch = step // plan.steps_per_epoch
        row = sft_step(engine, train, collate, plan, step, cfg.engine.packing)
        loss, done = row["loss"], step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if done % cfg.run.log_every == 0 or done == n_steps:
            logger.log(done, {**row, "grad_norm": engine.grad_norm, "lr": engine.lr, "epoch": epoch,
                              "skipped_steps": engine.skipped_steps})
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < n_steps:
            logger.log(done, evaluate(engine, evals, collate, cfg.engine.micro_batch_size, cfg.engine.packing), "eval")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_steps:
            save_resumable(out, engine, done, cfg.run, plan)
    bar.close()

    # ---- evaluate and save ----------------------------------------------------------------------
    # Without an eval split (eval_fraction 0) the summary holds the last step's training loss instead.
    batch_size, packing = cfg.engine.micro_batch_size, cfg.engine.packing
    metrics = evaluate(engine, evals, collate, batch_size, packing) if evals else {"train_loss": loss}
    logger.log(n_steps, metrics, "eval")
    engine.save_hf(out / MODEL_SUBDIR, tokenizer)
    if engine.is_rank_0:
        write_json_atomic(out / "eval.json", {"stage": "sft", "steps": n_steps, **metrics, "start": baseline,
                                              "precision": engine.precision.summary()})
    logger.close()
    return metrics
