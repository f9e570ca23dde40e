"""Saving a run so it can stop and go on, for every stage: one resumable checkpoint per save, and the step
to start from on ``--run.resume``.

SFT, RM and DPO train one engine (``save_resumable`` / ``resume_step``); the RL stages train an actor, maybe
a critic, and carry an EMA actor and stateful helpers (KL controller, reward normalisers) along
(``save_rl_resumable`` / ``resume_rl_step``, and ``save_rl_final`` for the finished run). The files
themselves are written by ``chatrlhf.engine.state`` (engines) and ``chatrlhf.checkpoint`` (step dirs).

A resume changes nothing before it has checked everything: the checkpoint to resume
(``checkpoint.resume_checkpoint``) has every state file read and checked (``engine.state.validate_checkpoint``:
schemas, tensor headers, RNG of every rank, how the files agree), then the batch layout, the RL extras and the
EMA weights are checked against this run, and only then is anything loaded (tensors are checked for NaN/inf as
they load). The stages open ``metrics.jsonl`` (which a resume cuts to the resumed step) only once the resume
step is known.
"""

from __future__ import annotations

from pathlib import Path

from chatrlhf.algorithms.advantages import stage_name
from chatrlhf.checkpoint import (
    CheckpointError,
    TrainerState,
    clean_stale,
    resume_checkpoint,
    write_json_atomic,
)
from chatrlhf.checkpoint_schema import Invalid, TensorMeta, fail, show
from chatrlhf.config import ConfigError, RunConfig
from chatrlhf.engine import Engine, NonFiniteError
from chatrlhf.engine.engine import write_model_dir
from chatrlhf.engine.state import restore_engines, save_engines, validate_checkpoint
from chatrlhf.models.lora import merged_for_save
from chatrlhf.tensor_files import first_nonfinite, load_weights, save_weights, weights_header
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
    path, state = _checkpoint_to_resume(out, run, ("",), one_step_per_step=True)
    if path is not None:
        _check_layout(path, state, plan.world_size, plan.global_batch)
        restore_engines(path, engine)  # checked by _checkpoint_to_resume
    step = state.step if state is not None else 0
    _resumed(out, run, f"from {path} at step {step}" if path is not None else None)
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
    engines = _rl_engines(actor, critic)
    path, state = _checkpoint_to_resume(out, run, engines)
    if path is None:
        _resumed(out, run, None)
        return 0
    if state is None:
        raise CheckpointError(f"{path}: no trainer_state.json; every RL checkpoint has one")
    _check_layout(path, state, actor.world_size, mini * actor.world_size)
    _load_stateful(path, state, stateful)
    if ema is not None:
        _check_ema_file(path, ema)
    restore_engines(path, engines)  # checked by _checkpoint_to_resume
    if ema is not None:
        ema.shadow = load_weights(path / "ema.safetensors", device=actor.device)
    _resumed(out, run, f"RL from {path} at iteration {state.step}")
    return state.step


def _load_stateful(path: Path, state: TrainerState, stateful: dict) -> None:
    """The KL controller and reward normalisers: each ``load_state_dict`` checks its state before setting it."""
    file = path / "trainer_state.json"
    for name, obj in stateful.items():
        if name not in state.extra:
            raise CheckpointError(f"{file} has no {name!r} state; it was written by a run with other settings "
                                  "(reward, KL controller); resume with the same ones")
        try:
            obj.load_state_dict(state.extra[name])
        except Invalid as bad:
            raise fail(file, bad.within(f"extra.{name}")) from None
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{file}: field 'extra.{name}': {err}") from None


def _check_ema_file(path: Path, ema) -> None:
    """``ema.safetensors`` (from its header) holds the EMA actor's tensors: same names, fp32, same shapes."""
    file = path / "ema.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path} has no ema.safetensors: it was written without --ema_beta; resume "
                              "with the same --ema_beta as the run that wrote it")
    got = weights_header(file)
    want = {name: TensorMeta("F32", tuple(t.shape)) for name, t in ema.shadow.items()}
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise CheckpointError(
                f"{file}: tensor {name!r} must be {show(want[name]) if name in want else 'absent'}, got "
                f"{show(got[name]) if name in got else 'none'}; resume with the model the checkpoint was "
                "trained from (--model.name_or_path of that run)"
            )


def save_rl_final(out: Path, actor: Engine, critic: Engine | None, ema, tokenizer, history: list[dict],
                  n_iters: int, kl_coef: float, estimator: str, extra: dict | None = None) -> dict:
    """The actor (``model/``), the critic (``critic/``), the EMA actor (``model_ema/``) and ``eval.json``."""
    actor.save_hf(out / MODEL_SUBDIR, tokenizer)
    if critic is not None:
        critic.save_hf(out / "critic", tokenizer)
    if ema is not None and actor.is_rank_0:
        _save_ema(out / "model_ema", actor, ema, tokenizer)
    last = history[-max(1, len(history) // 4):]  # the last quarter of the run
    summary = {k: sum(h[k] for h in last) / len(last) for k in ("reward/score", "kl", "response_length", "gold/overall")
               if last and all(k in h for h in last)}
    summary.update({"stage": stage_name(estimator), "advantage_estimator": estimator, "iterations": n_iters,
                    "kl_coef": kl_coef, **(extra or {})})
    if actor.is_rank_0:
        write_json_atomic(out / "eval.json", summary)
    return summary


def _save_ema(directory: Path, actor: Engine, ema, tokenizer) -> None:
    """The EMA actor as ``Engine.save_hf`` saves the actor: refused if its weights hold NaN/inf, else written
    atomically (``write_model_dir``). Rank 0 only; nothing collective follows it in ``save_rl_final``."""
    model, state = merged_for_save(actor.module, ema.shadow)  # LoRA: the averaged adapters merged in
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteError(f"the EMA weights (--ema_beta) hold NaN or inf (first: {bad}); nothing was saved to "
                             f"{directory}, and a model already there is untouched. Fix: lower the learning rate or "
                             "clip gradients (engine.max_grad_norm), then train again")
    write_model_dir(model, state, directory, tokenizer)


def _rl_engines(actor: Engine, critic: Engine | None) -> dict[str, Engine]:
    return {"actor": actor} if critic is None else {"actor": actor, "critic": critic}


def _checkpoint_to_resume(out: Path, run: RunConfig, names, one_step_per_step: bool = False
                          ) -> tuple[Path | None, TrainerState | None]:
    """On ``--run.resume``: the checkpoint to resume and its trainer state, every state file of it (engines
    ``names``) read and checked before anything is loaded or written; (None, None) to start at step 0."""
    if not run.resume:
        return None, None
    path = resume_checkpoint(out / CHECKPOINTS_SUBDIR)
    if path is None:
        _nothing_to_resume(out, run)
        return None, None
    return path, validate_checkpoint(path, names, one_step_per_step)


def _resumed(out: Path, run: RunConfig, what: str | None) -> None:
    """Once the checkpoint is checked and loaded, the scratch a crashed writer left is removed (for a resumed
    run this is the place; a damaged checkpoint leaves the dir as it was)."""
    if run.resume:
        for scratch in (out, out / CHECKPOINTS_SUBDIR):
            clean_stale(scratch)
    if what is not None:
        print(f"[chatrlhf] resumed {what}")


def _check_layout(path: Path, state: TrainerState | None, world_size: int, global_batch: int) -> None:
    """Stops a resume whose batch layout differs from the checkpoint's: step N would then mean other data
    and another LR schedule. (The process count may change when the global batch stays the same; ZeRO's
    partitioned optimizer state is checked by the engine.)"""
    if state is not None and state.global_batch and state.global_batch != global_batch:
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
