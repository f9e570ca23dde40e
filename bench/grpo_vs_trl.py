"""GRPO throughput, completions/s: chatrlhf's ``train_ppo`` (GRPOConfig) against TRL's ``GRPOTrainer``.

Two runs, each in its own fresh Python process, one after the other, with the same torch thread count:

    chatrlhf   chatrlhf.stages.ppo.train_ppo(GRPOConfig) with its defaults: --run.precision auto (bf16
               mixed precision where the CPU has amx_bf16 / avx512_bf16, else fp32) and
               --generation.backend auto (the run prints what it picked); --precision fp32 --backend
               native gives the exact path. Rollouts, then reference (and, unless the update reuses its
               own forward, old) log-probs, the reward, group-normalised advantages and one update with
               the k3 KL in the loss
    trl        trl.GRPOTrainer, fp32, generation by transformers' generate (no vLLM)

Same work on both sides: the same model (loaded in fp32, CPU), the same demo prompts (demo:prompts_train) in the same
order (TRL reads them unshuffled in the order chatrlhf's seeded plan draws them; the TRL worker checks that
its chat-template tokens equal chatrlhf's), --prompts prompts x --group answers per step, sampled at
temperature 1.0, top_p 1.0, no top-k, natural EOS stopping, at most --max-new-tokens tokens; the same
reward (chatrlhf.rewards.examples:length_reward, wrapped for TRL's reward_funcs signature); beta (the KL
coefficient) --beta with the k3 estimator in the loss; one optimizer update per rollout (TRL:
num_iterations 1 and steps_per_generation = gradient_accumulation_steps; chatrlhf: one PPO epoch over one
mini-batch of all answers), --micro-batch answers per forward; constant --lr without warm-up, AdamW betas
(0.9, 0.95), eps 1e-8, no weight decay, gradient-norm clip 1.0, dropout off, no gradient checkpointing.

Timing: each side stamps the end of every optimizer step (chatrlhf: a wrapper around ``Engine.step``
returning True; TRL: ``TrainerCallback.on_step_end``); a step's time is the gap between two consecutive
stamps, covering the whole iteration: generation, scoring (reward, old / reference log-probs), advantages,
the update and each library's per-step logging. Model loading and everything after the last step
(chatrlhf's model save) fall outside; the first --warmup steps (at least 1) are dropped. Generation is timed
on its own by wrapping the generate call (chatrlhf: ``chatrlhf.rollout.ActorRollouts.generate``; TRL: the policy's
``generate`` method), which gives each side's generation share of the step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/grpo_vs_trl.py [--model smollm2-135m-instruct --steps 8
        --warmup 1 --prompts 4 --group 4 --max-new-tokens 64 --micro-batch 8 --threads <cores> --json out.json]
"""

from __future__ import annotations

import argparse
import json
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

IMPLS = ("chatrlhf", "trl")
REWARD = "chatrlhf.rewards.examples:length_reward"


def grpo_config(args, out: Path):
    """chatrlhf's GRPOConfig for the run (also used by the parent to reproduce its prompt order)."""
    from chatrlhf.config import DataConfig, EngineConfig, GenerationConfig, ModelConfig, RunConfig
    from chatrlhf.stages.ppo_config import GRPOConfig

    answers = args.prompts * args.group
    return GRPOConfig(
        model=ModelConfig(name_or_path=args.model, dtype="float32"),
        reward=REWARD,
        data=DataConfig(datasets=["demo:prompts_train"], data_split="0,0,1", eval_fraction=0.0),
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                    backend=args.backend),
        actor_engine=EngineConfig(micro_batch_size=args.micro_batch,
                                  gradient_accumulation_steps=answers // args.micro_batch, learning_rate=args.lr,
                                  weight_decay=0.0, adam_betas=ADAM_BETAS, adam_eps=ADAM_EPS,
                                  lr_scheduler="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM,
                                  seed=args.seed),
        run=RunConfig(output_dir=str(out), overwrite=True, save_every=0, eval_at_start=False, log_every=1,
                      progress=False, precision=args.precision),
        rollout_batch_size=args.prompts, samples_per_prompt=args.group, max_iterations=args.warmup + args.steps,
        ppo_epochs=1, kl_coef=args.beta,
        # Scoring with the simulated rater each iteration (the over-optimisation plot's gold reward) is not
        # part of GRPO, and TRL does nothing like it.
        gold_every=0,
    )


def prepare_prompts(args, workdir: Path) -> dict:
    """Writes ``trl.jsonl``: chatrlhf's prompts (messages) in the order its plan draws them, one row per
    prompt per step, and ``prompt_ids.jsonl``: chatrlhf's token ids of the same rows (for TRL's check)."""
    from chatrlhf.data import encode_records, prepare_records
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.stages.ppo_setup import plan_iterations

    cfg = grpo_config(args, workdir / "unused")
    tokenizer = load_tokenizer(args.model)
    records, _ = prepare_records(cfg.data, kind="prompt", phase=cfg.phase)
    prompts = encode_records(records, "prompt", tokenizer, cfg.data, progress=False)
    plan, n_iters, _, _ = plan_iterations(cfg, len(prompts), 1, cfg.actor_engine.seed)
    order = [i for it in range(n_iters) for i in plan.batch(*divmod(it, plan.steps_per_epoch))]
    with open(workdir / "trl.jsonl", "w") as f, open(workdir / "prompt_ids.jsonl", "w") as g:
        for i in order:
            f.write(json.dumps({"prompt": prompts[i]["prompt"]}) + "\n")
            g.write(json.dumps(prompts[i]["input_ids"]) + "\n")
    mean_prompt = statistics.fmean(len(prompts[i]["input_ids"]) for i in order)
    return {"prompts": len(prompts), "mean_prompt_tokens": mean_prompt}


# ---- the implementations (each runs in its own process, see worker()) ---------------------------------
def run_chatrlhf(args, workdir: Path) -> dict:
    import chatrlhf.stages.ppo as ppo_stage
    from chatrlhf.engine import Engine
    from chatrlhf.rollout import ActorRollouts

    # The stage has no hooks: stamp the Engine's applied optimizer steps and time each generate call.
    # The stage's own code runs unchanged.
    ends, gen_seconds = [], []
    engine_step, generate = Engine.step, ActorRollouts.generate

    def stamped_step(self):
        applied = engine_step(self)
        if applied:
            ends.append(time.perf_counter())
        return applied

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        rollout = generate(*a, **kw)
        gen_seconds.append(time.perf_counter() - start)
        return rollout

    Engine.step, ActorRollouts.generate = stamped_step, timed_generate
    out = workdir / "chatrlhf-out"
    ppo_stage.train_ppo(grpo_config(args, out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/response_length" in r]
    return {"ends": ends, "gen_seconds": gen_seconds, "lengths": [r["train/response_length"] for r in rows],
            "rewards": [r["train/reward/score"] for r in rows],
            "generation": f"chatrlhf ActorRollouts (backend {args.backend!r}, precision {args.precision!r})",
            "optimizer": "Engine: torch.optim.AdamW, fused kernel (ZeRO 0)"}


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chatrlhf.models.loading import load_tokenizer, resolve_model
    from chatrlhf.rewards.examples import length_reward

    ends, gen_seconds, lengths, rewards = [], [], [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **kw):  # after clip, optimizer step, LR step and zero_grad
            ends.append(time.perf_counter())

        def on_log(self, *a, logs=None, **kw):  # every step, as chatrlhf logs every iteration
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                rewards.append(logs["reward"])

    def length_reward_trl(prompts, completions, **kwargs) -> list[float]:
        """TRL's reward_funcs signature around the same rule: conversational prompts and completions."""
        return [length_reward(p[-1]["content"], c[-1]["content"], {}) for p, c in zip(prompts, completions)]

    rows = [json.loads(line) for line in (workdir / "trl.jsonl").read_text().splitlines()]
    answers = args.prompts * args.group
    optim = {"optim": args.trl_optim} if args.trl_optim else {}
    config = GRPOConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=answers // args.micro_batch,  # one generation batch = one optimizer step
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, beta=args.beta, num_iterations=1, use_vllm=False, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, max_grad_norm=MAX_GRAD_NORM,
        seed=args.seed, disable_dropout=True,
        # The rows are already in chatrlhf's order; read them as they are.
        shuffle_dataset=False,
        # TRL's defaults turn bf16 and activation checkpointing on (on CPU too).
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        # Per-step logging (lengths, rewards), as the chatrlhf run logs every iteration; nothing is saved.
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False, **optim,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward_trl, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepClock()])
    # Same prompts, same tokens: TRL's own prompt tokenisation against chatrlhf's ids.
    ours = [json.loads(line) for line in (workdir / "prompt_ids.jsonl").read_text().splitlines()[: args.prompts]]
    theirs = trainer._tokenize_prompts([r["prompt"] for r in rows[: args.prompts]])[0]
    if [list(t) for t in theirs] != ours:
        raise RuntimeError("TRL's prompt tokens differ from chatrlhf's on the same prompts; the comparison would "
                           "not be like for like")
    # Time generation: TRL calls the (unwrapped, here the same) policy's generate once per generation batch.
    policy_generate = trainer.model.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = policy_generate(*a, **kw)
        gen_seconds.append(time.perf_counter() - start)
        return out

    trainer.model.generate = timed_generate
    trainer.train()
    optim_name = getattr(config.optim, "value", config.optim)
    return {"ends": ends, "gen_seconds": gen_seconds, "lengths": lengths, "rewards": rewards,
            "generation": "transformers generate (GRPOTrainer without vLLM)",
            "optimizer": f"optim={optim_name} (GRPOConfig.optim), loss_type={config.loss_type}"}


WORKERS = {"chatrlhf": run_chatrlhf, "trl": run_trl}


# ---- report ---------------------------------------------------------------------------------------------
def report(results: dict[str, dict], args, data: dict) -> str:
    answers = args.prompts * args.group
    w = args.warmup
    rows, stats = [], {}
    for impl, r in results.items():
        times = step_durations(r["ends"])[w - 1 :]
        s = stats[impl] = StepStats.of(times)
        gen = r["gen_seconds"][w:]  # one generate call per step; the first `warmup` belong to untimed steps
        share = sum(gen) / sum(times) if len(gen) == len(times) else float("nan")
        length = statistics.fmean(r["lengths"][w:]) if r["lengths"][w:] else float("nan")
        reward = statistics.fmean(r["rewards"][w:]) if r["rewards"][w:] else float("nan")
        rows.append([impl, f"{s.median:.2f}", f"{s.minimum:.2f}", f"{s.stdev:.2f}", f"{answers / s.median:.3f}",
                     f"{answers * length / s.median:.1f}", f"{statistics.median(gen):.2f}" if gen else "-",
                     f"{share:.0%}", f"{length:.1f}", f"{reward:.3f}"])
    if "trl" in stats:
        for row, impl in zip(rows, results):
            row.insert(5, f"{stats['trl'].median / stats[impl].median:.2f}")
    headers = ["implementation", "step median (s)", "step min (s)", "step stdev (s)", "completions/s",
               *(["x TRL"] if "trl" in stats else []), "completion tokens/s", "generate median (s)",
               "generation share", "mean completion length", "mean reward"]
    notes = [f"- {impl}: {r['generation']}; {r['optimizer']}; torch threads after training: {r['threads_after']}"
             for impl, r in results.items()]
    return "\n".join([
        f"machine: {machine_description(args.threads)}",
        f"model {args.model} fp32 | {args.prompts} prompts x {args.group} answers = {answers} completions per step "
        f"(demo:prompts_train, {data['mean_prompt_tokens']:.0f} prompt tokens on average), at most "
        f"{args.max_new_tokens} new tokens, T=1.0 top_p=1.0 | micro-batch {args.micro_batch} | reward {REWARD} | "
        f"beta {args.beta}, lr {args.lr} | {args.steps} timed steps after {w} warm-up | load avg at end "
        f"{load_average()}",
        "",
        markdown_table(headers, rows),
        "",
        "completions/s = completions per step / median step time (generation + scoring + update). x TRL: "
        "TRL's median step time / this row's (> 1 is faster). completion tokens/s uses the mean completion "
        "length of the timed steps; generation share = generate time / step time, summed over the timed steps.",
        *notes,
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama) or a local HF model dir")
    p.add_argument("--steps", type=int, default=8, help="timed steps (rollout + update) per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="answers per prompt (GRPO's group size)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="answers per forward/backward; must divide --prompts x --group (the rest is accumulation)")
    p.add_argument("--backend", choices=("auto", "native", "hf", "vllm"), default="auto",
                   help="chatrlhf's generation backend (auto: as chatrlhf picks it, printed by the run)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="chatrlhf's --run.precision (auto: bf16 where the CPU has amx_bf16/avx512_bf16)")
    p.add_argument("--lr", type=float, default=5e-6, help="constant learning rate, no warm-up")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 estimator, in the loss)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads for every run")
    p.add_argument("--trl-optim", default=None,
                   help="TRL's GRPOConfig.optim (default: TRL's own, adamw_torch_fused, the kernel "
                        "chatrlhf's Engine uses at ZeRO 0; adamw_torch = the for-loop one)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the raw step stamps and results here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "prompts", "max_new_tokens", "micro_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error(f"--group must be >= 2 (GRPO compares the answers to one prompt), got {args.group}")
    if (args.prompts * args.group) % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --prompts x --group = {args.prompts * args.group}")
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(WORKERS, args.worker, args.workdir)
        return
    results, data = run_sequentially(args, IMPLS, __file__, prepare_prompts, "grpo-vs-trl-")
    publish(report(results, args, data), args, data, results)


if __name__ == "__main__":
    main()
