"""ILQL (Implicit Language Q-Learning, Snell et al. 2022): offline RL on prompt/response/score rows.

The trunk (a causal LM) carries Q heads (two, with Polyak-averaged targets) and a V head over its last hidden
states. Every answer token is an action; the row's score is the reward of its last one. Per micro-batch, one
forward gives the LM logits and the heads; the loss (``chatrlhf.algorithms.ilql.ilql_losses``) is
    TD:  (Q_i(s, a) - [r + gamma V(s')])^2      expectile: L2_tau(min_i Q^_i(s, a) - V(s))
    CQL: logsumexp Q_i(s, .) - Q_i(s, a)        BC: -log pi_beta(a|s) (the trunk stays the behaviour policy)
summed over answer tokens and divided by the answer tokens of the whole optimizer step (every micro-batch and
process), so micro-batch x accumulation equals the full batch. After each optimizer step the target heads move
toward the online ones (Polyak). Decoding: log pi_beta(a|s) + beta (min_i Q^_i(s, a) - V(s))
(``chatrlhf.models.ilql.ILQLPolicy``, through the native sampler).

Loop: load (tokenizer, scored rows, trunk + heads) -> for each optimizer step: forward -> ILQL + BC loss ->
backward -> step -> Polyak -> log / eval / checkpoint -> final eval (losses; with ``--reward``, the reward of
answers decoded at beta 0 and at beta) -> save the LM with its heads.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from chatrlhf.algorithms import answer_mask, gather_log_probs, position_ids_from_mask, zero_off_mask
from chatrlhf.algorithms.ilql import ilql_losses, terminal_rewards
from chatrlhf.checkpoint import write_json_atomic
from chatrlhf.data import RatingCollator, encode_records, prepare_records
from chatrlhf.engine import Engine, init_distributed
from chatrlhf.models import disable_dropout, load_causal_lm, load_tokenizer
from chatrlhf.models.ilql import ILQLHeads, ILQLModel, ILQLPolicy
from chatrlhf.precision import announce
from chatrlhf.resume import resume_step, save_resumable
from chatrlhf.stages.ilql_config import ILQLConfig
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

STATS = ("loss", "loss/q", "loss/v", "loss/cql", "loss/bc", "q", "v", "target_q")


def _actions(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention mask (B, T), actions (B, T-1), answer-action mask (B, T-1)): action t is token t+1."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return ids, mask, ids[:, 1:], answer_mask(mask, batch["prompt_lens"].to(device))[:, 1:]


def answer_actions(batches: list[tuple[dict, int]]) -> torch.Tensor:
    """The answer actions in the first ``keep`` rows of each batch, as a float64 scalar (the loss normaliser)."""
    cpu = torch.device("cpu")
    return torch.tensor(float(sum(_actions(b, cpu)[3][:keep].sum() for b, keep in batches)), dtype=torch.float64)


def _terms(model, batch: dict, cfg: ILQLConfig, num_tokens: torch.Tensor, device: torch.device,
           keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the micro-batch's share of the step's loss, its (8,) float64 stat sums: the STATS, each loss part
    already divided by ``num_tokens`` and each mean weighted by this batch's answer actions)."""
    ids, mask, actions, act_mask = _actions(batch, device)
    if keep is not None:  # rows past ``keep`` repeat an item only to keep batch counts equal across ranks
        act_mask = act_mask & (torch.arange(len(ids), device=device) < keep)[:, None]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    n = num_tokens.to(device=device, dtype=torch.float32)
    losses = ilql_losses(out.heads.qs, out.heads.target_qs, out.heads.v, actions,
                         terminal_rewards(batch["scores"].to(device), act_mask), act_mask,
                         gamma=cfg.gamma, tau=cfg.tau, cql_scale=cfg.cql_scale, num_tokens=n)
    log_probs = gather_log_probs(out.logits[:, :-1], actions)  # (B, T-1) under pi_beta
    bc = -zero_off_mask(log_probs, act_mask).sum() / n
    total = losses.total + cfg.bc_scale * bc
    local = act_mask.sum()
    parts = [total, losses.q, losses.v, losses.cql, bc, losses.q_mean * local, losses.v_mean * local,
             losses.target_q_mean * local]
    return total, torch.stack([x.detach().double().cpu() for x in parts])


def _summary(sums: torch.Tensor, num_tokens: torch.Tensor) -> dict[str, float]:
    n = max(num_tokens.item(), 1.0)
    return {name: (v / n if i >= 5 else v) for i, (name, v) in enumerate(zip(STATS, sums.tolist()))}


def ilql_step(engine: Engine, train: list[dict], collate, plan: BatchPlan, step: int,
              cfg: ILQLConfig) -> dict[str, float]:
    """One optimizer step over this process's micro-batches, then the Polyak update of the target heads."""
    batches = [(collate([train[i] for i in micro]), len(micro))
               for micro in micro_batches_of_step(engine, plan, step, train)]
    num_tokens = engine.all_reduce(answer_actions(batches).to(engine.device)).cpu()  # the whole step's
    sums = torch.zeros(len(STATS), dtype=torch.float64)
    for batch, _ in batches:
        loss, parts = _terms(engine, batch, cfg, num_tokens, engine.device)
        engine.backward(loss * engine.world_size)  # the normaliser is global; DeepSpeed averages over ranks
        if engine.step():
            engine.module.heads.sync_targets(cfg.polyak_alpha)
        sums += parts
    return {**_summary(engine.all_reduce(sums.to(engine.device)).cpu(), num_tokens), "tokens": num_tokens.item()}


@torch.no_grad()
def evaluate(engine: Engine, data: list[dict], collate, batch_size: int, cfg: ILQLConfig) -> dict[str, float]:
    """The losses over ``data`` (normalised by all its answer tokens), sharded across ranks and summed exactly."""
    engine.eval()
    batches = [(collate([data[i] for i in idx]), real)
               for idx, real in rank_batches(len(data), engine.rank, engine.world_size, batch_size)]
    num_tokens = engine.all_reduce(answer_actions(batches).to(engine.device)).cpu()
    sums = torch.zeros(len(STATS), dtype=torch.float64)
    for batch, real in batches:
        sums += _terms(engine, batch, cfg, num_tokens, engine.device, keep=real)[1]
    engine.train()
    return _summary(engine.all_reduce(sums.to(engine.device)).cpu(), num_tokens)


def eval_prompts(records: list[dict], limit: int) -> list[list[dict]]:
    """The first ``limit`` distinct prompts of ``records`` (messages), in order."""
    seen: dict[str, list[dict]] = {}
    for rec in records:
        seen.setdefault(repr(rec["prompt"]), rec["prompt"])
    return list(seen.values())[:limit]


@torch.no_grad()
def decode_and_score(engine: Engine, tokenizer, prompts: list[list[dict]], reward, cfg: ILQLConfig) -> dict:
    """The reward's mean over answers decoded from ``prompts`` by the plain LM (beta 0) and by the ILQL policy
    (``cfg.beta``), plus a few samples. Rank 0 decodes (the weights are whole on every rank below ZeRO-3)."""
    from chatrlhf.data import PromptCollator, encode_records
    from chatrlhf.evaluation.answers import eos_token_ids
    from chatrlhf.rewards.contract import RewardBatch
    from chatrlhf.rollout import decode_responses, generate

    out: dict = {}
    if engine.is_rank_0 and prompts:
        items = encode_records([{"prompt": p} for p in prompts], "prompt", tokenizer, cfg.data, progress=False)
        batch = PromptCollator(tokenizer.pad_token_id)(items)
        ids, mask = batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)
        with engine.generation_mode() as model:
            eos = eos_token_ids(tokenizer, model.lm)
            for name, beta in (("beta0", 0.0), ("ilql", cfg.beta)):
                policy = model.lm if beta == 0 else ILQLPolicy(model, beta)
                rollout = generate(policy, ids, mask, cfg.generation.sampling(), eos_token_ids=eos,
                                   pad_token_id=tokenizer.pad_token_id, backend="native", max_batch=16)
                answers = decode_responses(tokenizer, rollout)
                scores = reward(RewardBatch(rollout.sequences, rollout.attention_mask, batch["prompts"], answers,
                                            rollout.finished.tolist(), batch.get("meta", [])))
                out[f"reward/{name}"] = scores.float().mean().item()
                out[f"samples/{name}"] = answers[:3]
    engine.barrier()
    return out


def _load(cfg: ILQLConfig, n_steps: int) -> Engine:
    m = cfg.model
    lm = load_causal_lm(m.name_or_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                        gradient_checkpointing=m.gradient_checkpointing)
    if cfg.disable_dropout:
        disable_dropout(lm)
    vocab = lm.get_output_embeddings().weight.shape[0]
    heads = ILQLHeads(lm.config.hidden_size, vocab, two_qs=cfg.two_qs).to(next(lm.parameters()).dtype)
    engine = Engine(ILQLModel(lm, heads), cfg.engine, total_steps=n_steps, precision=cfg.run.precision)
    if engine.is_rank_0:
        announce(engine.precision)
    return engine


def _reward_eval(engine, tokenizer, cfg: ILQLConfig, records: list[dict]):
    """A closure scoring decoded answers with ``--reward`` (None without one)."""
    if not cfg.reward or not cfg.eval_prompts:
        return None
    from chatrlhf.rewards.factory import build_reward_source

    if cfg.eval_prompt_source:
        from chatrlhf.data import convert_records, load_records

        loaded, kind = load_records(cfg.eval_prompt_source)
        records = convert_records(loaded, kind, "prompt")
    reward, prompts = build_reward_source(cfg.reward, tokenizer), eval_prompts(records, cfg.eval_prompts)
    return lambda: decode_and_score(engine, tokenizer, prompts, reward, cfg)


def train_ilql(cfg: ILQLConfig) -> dict[str, float]:
    cfg.validate()
    rank, world = init_distributed()
    out = prepare_output_dir(cfg.run)
    set_seed(cfg.engine.seed)

    # ---- data: scored answers -------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    train_records, eval_records = prepare_records(cfg.data, kind="rating", phase=cfg.phase)
    train = encode_records(train_records, "rating", tokenizer, cfg.data, progress=cfg.run.progress and rank == 0)
    evals = encode_records(eval_records, "rating", tokenizer, cfg.data, progress=False)
    collate, batch_size = RatingCollator(tokenizer.pad_token_id), cfg.engine.micro_batch_size

    # ---- trunk + heads in one engine ------------------------------------------------------------
    plan = BatchPlan(len(train), batch_size, cfg.engine.gradient_accumulation_steps, world, cfg.engine.seed)
    plan.check("ilql")
    n_steps = total_steps(plan, cfg.epochs, cfg.max_steps)
    engine = _load(cfg, n_steps)
    start = resume_step(out, engine, cfg.run, plan)
    logger = MetricsLogger(out, enabled=engine.is_rank_0, start=start)
    if engine.is_rank_0:
        write_resolved_config(out, cfg)
        logger.log(start, {"records": len(train), "eval_records": len(evals), "total_steps": n_steps}, "data")
    reward_eval = _reward_eval(engine, tokenizer, cfg, eval_records or train_records)
    baseline = {}
    if cfg.run.eval_at_start and start == 0:
        baseline = {**(evaluate(engine, evals, collate, batch_size, cfg) if evals else {}),
                    **(reward_eval() if reward_eval else {})}
        logger.log(0, {k: v for k, v in baseline.items() if not k.startswith("samples/")}, "eval")

    # ---- train ----------------------------------------------------------------------------------
    bar = tqdm(total=n_steps, initial=start, desc="ilql", disable=not (cfg.run.progress and engine.is_rank_0))
    for step in range(start, n_steps):
        row = ilql_step(engine, train, collate, plan, step, cfg)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", q=f"{row['q']:.3f}", v=f"{row['v']:.3f}")
        if done % cfg.run.log_every == 0 or done == n_steps:
            logger.log(done, {**row, "grad_norm": engine.grad_norm, "lr": engine.lr,
                              "epoch": step // plan.steps_per_epoch, "skipped_steps": engine.skipped_steps})
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < n_steps and evals:
            logger.log(done, evaluate(engine, evals, collate, batch_size, cfg), "eval")
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < n_steps:
            save_resumable(out, engine, done, cfg.run, plan)
    bar.close()

    # ---- evaluate and save ----------------------------------------------------------------------
    metrics = {**(evaluate(engine, evals, collate, batch_size, cfg) if evals else {}),
               **(reward_eval() if reward_eval else {})}
    logger.log(n_steps, {k: v for k, v in metrics.items() if not k.startswith("samples/")}, "eval")
    engine.save_hf(out / MODEL_SUBDIR, tokenizer)
    if engine.is_rank_0:
        write_json_atomic(out / "eval.json", {"stage": "ilql", "beta": cfg.beta, "steps": n_steps, **metrics,
                                              "start": baseline or None, "precision": engine.precision.summary()})
    logger.close()
    return metrics
