"""Saving a run so it can stop and go on, for every stage: one resumable checkpoint per save, and the step
to start from on ``--run.resume``.

SFT, RM and DPO train one engine (``save_resumable`` / ``resume_step``); the RL stages train an actor, maybe
a critic, and carry an EMA actor and stateful helpers (KL controller, reward normalisers) along
(``save_rl_resumable`` / ``resume_rl_step``, and ``save_rl_final`` for the finished run). The files
themselves are written by ``chatrlhf.engine.state`` (engines) and ``chatrlhf.checkpoint`` (step dirs).
"""

from __future__ import annotations

from pathlib import Path

from chatrlhf.algorithms.advantages import stage_name
from chatrlhf.checkpoint import (
    CheckpointError,
    TrainerState,
    latest_checkpoint,
    load_trainer_state,
    write_json_atomic,
)
from chatrlhf.config import ConfigError, RunConfig
from chatrlhf.engine import Engine
from chatrlhf.engine.state import load_engines, save_engines
from chatrlhf.models.lora import merged_for_save
from chatrlhf.tensor_files import load_weights, save_weights
from chatrlhf.training import CHECKPOINTS_SUBDIR, MODEL_SUBDIR, BatchPlan


def save_resumable(out: Path, engine: Engine, step: int, run: RunConfig, plan: BatchPlan) -> None:
    """A resumable checkpoint: engine state (model, optimizer, scheduler), RNG per rank, data position.

    The data position is ``step`` alone: ``BatchPlan.batch`` is a pure function of (seed, epoch, step).
    """
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    state = TrainerState(step=step, epoch=epoch, step_in_epoch=in_epoch, samples_seen=step * plan.global_batch,
                         world_size=plan.world_size, global_batch=plan.global_batch)
    save_engines(out / CHECKPOINTS_SUBDIR, step, engine, state, keep_last=run.keep_last)


def resume_step(out: Path, engine: Engine, run: RunConfig, plan: BatchPlan) -> int:
    """The optimizer step to start from: 0, or the step of the latest complete checkpoint on ``--run.resume``."""
    path = _checkpoint_to_resume(out, run)
    if path is None:
        return 0
    _check_layout(path, plan.world_size, plan.global_batch)
    state = load_engines(path, engine)
    step = state.step if state is not None else 0
    print(f"[chatrlhf] resumed from {path} at step {step}")
    return step


def save_rl_resumable(out: Path, actor: Engine, critic: Engine | None, step: int, run: RunConfig,
                      stateful: dict, ema, mini: int) -> None:
    """One crash-safe checkpoint per iteration: ``actor/`` and ``critic/`` engine state, the EMA weights
    (``ema.safetensors``) and ``stateful`` (name -> object with ``state_dict``: the KL controller, reward
    normalisers) in the trainer state, all committed together."""
    extra = {name: obj.state_dict() for name, obj in stateful.items()}
    state = TrainerState(step=step, extra=extra, world_size=actor.world_size, global_batch=mini * actor.world_size)

    def write_ema(directory: Path) -> None:
        if ema is not None:
            save_weights(ema.shadow, directory / "ema.safetensors")

    save_engines(out / CHECKPOINTS_SUBDIR, step, _rl_engines(actor, critic), state, run.keep_last,
                 write_extra=write_ema)


def resume_rl_step(out: Path, actor: Engine, critic: Engine | None, run: RunConfig, stateful: dict, ema,
                   mini: int) -> int:
    """The iteration to start from: 0, or that of the latest complete checkpoint on ``--run.resume``."""
    path = _checkpoint_to_resume(out, run)
    if path is None:
        return 0
    _check_layout(path, actor.world_size, mini * actor.world_size)
    state = load_engines(path, _rl_engines(actor, critic))
    for name, obj in stateful.items():
        if name not in state.extra:
            raise CheckpointError(f"{path / 'trainer_state.json'} has no {name!r} state; it was written by "
                                  "a run with other settings (reward, KL controller); resume with the same ones")
        obj.load_state_dict(state.extra[name])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path} has no ema.safetensors: it was written without --ema_beta; resume "
                                  "with the same --ema_beta as the run that wrote it")
        ema.shadow = load_weights(path / "ema.safetensors", device=actor.device)
    print(f"[chatrlhf] resumed RL from {path} at iteration {state.step}")
    return state.step


def save_rl_final(out: Path, actor: Engine, critic: Engine | None, ema, tokenizer, history: list[dict],
                  n_iters: int, kl_coef: float, estimator: str, extra: dict | None = None) -> dict:
    """The actor (``model/``), the critic (``critic/``), the EMA actor (``model_ema/``) and ``eval.json``."""
    actor.save_hf(out / MODEL_SUBDIR, tokenizer)
    if critic is not None:
        critic.save_hf(out / "critic", tokenizer)
    if ema is not None and actor.is_rank_0:
        model, state = merged_for_save(actor.module, ema.shadow)  # LoRA: the averaged adapters merged in
        model.save_pretrained(out / "model_ema", state_dict=state)
        tokenizer.save_pretrained(out / "model_ema")
    last = history[-max(1, len(history) // 4):]  # the last quarter of the run
    summary = {k: sum(h[k] for h in last) / len(last) for k in ("reward/score", "kl", "response_length", "gold/overall")
               if last and all(k in h for h in last)}
    summary.update({"stage": stage_name(estimator), "advantage_estimator": estimator, "iterations": n_iters,
                    "kl_coef": kl_coef, **(extra or {})})
    if actor.is_rank_0:
        write_json_atomic(out / "eval.json", summary)
    return summary


def _rl_engines(actor: Engine, critic: Engine | None) -> dict[str, Engine]:
    return {"actor": actor} if critic is None else {"actor": actor, "critic": critic}


def _checkpoint_to_resume(out: Path, run: RunConfig) -> Path | None:
    """The latest complete checkpoint under ``out`` on ``--run.resume``; None to start at step 0."""
    if not run.resume:
        return None
    path = latest_checkpoint(out / CHECKPOINTS_SUBDIR)
    if path is None:
        _nothing_to_resume(out, run)
    return path


def _check_layout(path: Path, world_size: int, global_batch: int) -> None:
    """Stops a resume whose batch layout differs from the checkpoint's: step N would then mean other data
    and another LR schedule. (The process count may change when the global batch stays the same; ZeRO's
    partitioned optimizer state is checked by the engine.)"""
    if not (path / "trainer_state.json").is_file():
        return
    state = load_trainer_state(path)
    if state.global_batch and state.global_batch != global_batch:
        raise CheckpointError(
            f"{path} was written by {state.world_size} process(es) with {state.global_batch} samples per "
            f"optimizer step, but this run has {world_size} process(es) with {global_batch}. Resume with the "
            "same global batch (micro_batch_size x gradient_accumulation_steps x processes) or start a new run."
        )


def _nothing_to_resume(out: Path, run: RunConfig) -> None:
    """``--run.resume`` found no checkpoint: start at step 0, unless that would replace a finished model
    without ``--run.overwrite``."""
    if (out / MODEL_SUBDIR / "config.json").exists() and not run.overwrite:
        raise ConfigError(
            f"--run.resume: {out / CHECKPOINTS_SUBDIR} holds no complete checkpoint, and {out / MODEL_SUBDIR} "
            "holds a finished model: the run is done. Pass --run.overwrite true to train it again."
        )
    print(f"[chatrlhf] --run.resume: no complete checkpoint under {out / CHECKPOINTS_SUBDIR}; starting at step 0")
