"""Hostile checkpoints: each case damages one state file of a copy of a finished run, then resumes it.

Every case goes through ``hostile.check_case``: exit status 2, no traceback, one error line naming the file,
the field or tensor and what is wrong, and no file changed. The last check is the point: ``metrics.jsonl``
(which a resume cuts to the resumed step), ``latest`` and the checkpoint keep their bytes, so the resume
checked every state file before it touched anything.

SFT_CASES damage the finished tiny SFT run of conftest.py (trainer state, scheduler, engine counters, RNG,
``latest``, manifest, model and optimizer tensors); RL_CASES a tiny PPO run built once per module, with a
critic, the EMA actor, the adaptive KL controller and reward normalisation (their saved state, EMA and critic
weights). 68 SFT cases, 6 RL cases.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hostile import WORDS, Case, Env, check_case, param, tamper_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chatrlhf.cli import main

pytestmark = pytest.mark.slow

TS, ENGINE, SCHED, RNG, OPT, MODEL = ("trainer_state.json", "engine.json", "scheduler.json", "rng.rank0.json",
                                      "optimizer.json", "model.safetensors")
RNG_T = "rng.rank0.safetensors"
GONE = object()  # edit(): remove the field
Damage = Callable[[Path], None]


def step1(run: Path) -> Path:
    return run / "checkpoints" / "step-1"


# ----------------------------------------------------------------------------- ways to damage a run copy
def edit(name: str, path: tuple, value) -> Damage:
    """step-1/``name`` with the field at ``path`` (keys and list indices) set to ``value`` (GONE: removed)."""

    def damage(run: Path) -> None:
        tamper_checkpoint(run, name, json.dumps(_set(json.loads((step1(run) / name).read_text()), path, value)).encode())

    return damage


def _set(data, path: tuple, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is GONE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def text(name: str, old: str, new: str) -> Damage:
    """step-1/``name`` with ``old`` replaced by ``new`` in its text (for what json.dumps cannot write)."""

    def damage(run: Path) -> None:
        before = (step1(run) / name).read_text()
        assert old in before, (old, before[:300])
        tamper_checkpoint(run, name, before.replace(old, new, 1).encode())

    return damage


def raw(name: str, content: bytes) -> Damage:
    return lambda run: tamper_checkpoint(run, name, content)


def cut(name: str, keep: int) -> Damage:
    return lambda run: tamper_checkpoint(run, name, (step1(run) / name).read_bytes()[:keep])


def tensor(name: str, key: str, value: float | None = None, replace=None) -> Damage:
    """step-1/``name`` (safetensors, metadata kept) with ``key``'s first element set to ``value``, or the whole
    tensor replaced by ``replace``."""

    def damage(run: Path) -> None:
        path = step1(run) / name
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        if replace is not None:
            tensors[key] = replace
        else:
            tensors[key].view(-1)[0] = value
        scratch = run / "scratch.safetensors"
        save_file(tensors, str(scratch), metadata=metadata)
        tamper_checkpoint(run, name, scratch.read_bytes())
        scratch.unlink()

    return damage


def pointer(content: str) -> Damage:
    return lambda run: (run / "checkpoints" / "latest").write_text(content)


def manifest(path: tuple, value) -> Damage:
    """The manifest itself, not rewritten to match (tamper_checkpoint would)."""

    def damage(run: Path) -> None:
        file = step1(run) / "manifest.json"
        file.write_text(json.dumps(_set(json.loads(file.read_text()), path, value)))

    return damage


def second_rank_rng(run: Path) -> None:
    """A damaged RNG state of rank 1 beside rank 0's good one: a resume checks every rank's, not only its own."""
    data = json.loads((step1(run) / RNG).read_text())
    data["numpy"]["state"]["pos"] = 999
    tamper_checkpoint(run, "rng.rank1.json", json.dumps(data).encode())
    tamper_checkpoint(run, "rng.rank1.safetensors", (step1(run) / "rng.rank0.safetensors").read_bytes())


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def both(*damages: Damage) -> Damage:
    def damage(run: Path) -> None:
        for one in damages:
            one(run)

    return damage


def sft(damage: Damage):
    def build(env: Env) -> list[str]:
        run = env.run_copy()
        damage(run)
        return env.resume(run)

    return build


F = "must be a finite number"
INT = "must be an integer >= 0"
SFT_CASES = [
    # ---- trainer_state.json: types, ranges, relations between fields
    Case("state-step-negative", sft(edit(TS, ("step",), -1)), ("step-1/trainer_state.json", "field 'step'", INT,
                                                                "got -1")),
    Case("state-step-text", sft(edit(TS, ("step",), "abc")), ("trainer_state.json", "field 'step'", INT, 'got "abc"')),
    Case("state-step-fraction", sft(edit(TS, ("step",), 2.5)), ("trainer_state.json", "field 'step'", INT, "got 2.5")),
    Case("state-step-list", sft(edit(TS, ("step",), [3])), ("trainer_state.json", "field 'step'", INT, "got [3]")),
    Case("state-step-bool", sft(edit(TS, ("step",), True)), ("trainer_state.json", "field 'step'", INT, "got true")),
    Case("state-step-beyond-64-bits", sft(edit(TS, ("step",), 2**70)), ("trainer_state.json", "field 'step'",
                                                                        "beyond 64 bits")),
    Case("state-step-above-int64", sft(edit(TS, ("step",), 2**63)), ("trainer_state.json", "'step'", "64 bits")),
    Case("state-step-missing", sft(edit(TS, ("step",), GONE)), ("trainer_state.json", "field 'step' is missing")),
    Case("state-step-null", sft(edit(TS, ("step",), None)), ("trainer_state.json", "field 'step'", INT, "got null")),
    Case("state-epoch-text", sft(edit(TS, ("epoch",), "0")), ("trainer_state.json", "field 'epoch'", INT, 'got "0"')),
    Case("state-epoch-after-step", sft(edit(TS, ("epoch",), 5)), ("trainer_state.json", "field 'epoch'",
                                                                  "<= step (1)", "got 5")),
    Case("state-step-in-epoch-negative", sft(edit(TS, ("step_in_epoch",), -3)), ("field 'step_in_epoch'", INT)),
    Case("state-step-in-epoch-after-step", sft(edit(TS, ("step_in_epoch",), 7)), ("field 'step_in_epoch'",
                                                                                  "<= step (1)", "got 7")),
    Case("state-samples-seen-too-many", sft(edit(TS, ("samples_seen",), 9999)),
         ("field 'samples_seen'", "<= step x global_batch (1 x 2)", "got 9999")),
    Case("state-samples-seen-infinite", sft(text(TS, '"samples_seen": 2', '"samples_seen": 1e999')),
         ("trainer_state.json", "field 'samples_seen'", "finite number")),
    Case("state-world-size-negative", sft(edit(TS, ("world_size",), -1)), ("field 'world_size'", INT, "got -1")),
    Case("state-global-batch-text", sft(edit(TS, ("global_batch",), "2")), ("field 'global_batch'", INT)),
    Case("state-global-batch-not-multiple", sft(edit(TS, ("world_size",), 4)),
         ("field 'global_batch'", "a multiple of world_size (4)", "got 2")),
    Case("state-extra-list", sft(edit(TS, ("extra",), [])), ("field 'extra'", "must be a JSON object", "got []")),
    Case("state-extra-infinite", sft(text(TS, '"extra": {}', '"extra": {"best": [1, 1e999]}')),
         ("trainer_state.json", "field 'extra.best[1]'", "finite number")),
    Case("state-extra-nan-constant", sft(text(TS, '"extra": {}', '"extra": {"best": NaN}')),
         ("trainer_state.json", "'NaN' is not a JSON number")),
    Case("state-extra-nested-deep", sft(text(TS, '"extra": {}', f'"extra": {nested(5000)}')),
         ("trainer_state.json", "nested deeper than 100 levels")),
    Case("state-duplicate-key", sft(text(TS, '"step": 1', '"step": 1, "step": 9')),
         ("trainer_state.json", "key 'step' appears twice")),
    Case("state-top-level-list", sft(raw(TS, b"[1, 2]")), ("trainer_state.json", "expected a JSON object", "[1, 2]")),
    Case("state-not-utf8", sft(raw(TS, b'{"step": "\xff\xfe"}')), ("trainer_state.json", "is not UTF-8")),
    # ---- scheduler.json
    Case("sched-base-lrs-text", sft(edit(SCHED, ("base_lrs",), ["a", "b"])),
         ("step-1/scheduler.json", "field 'base_lrs[0]'", "must be a finite number >= 0", 'got "a"')),
    Case("sched-base-lrs-infinite", sft(text(SCHED, "2e-05\n", "1e999\n")),
         ("scheduler.json", "field 'base_lrs[1]'", "finite number")),
    Case("sched-base-lrs-negative", sft(edit(SCHED, ("base_lrs", 0), -0.1)), ("field 'base_lrs[0]'", ">= 0")),
    Case("sched-base-lrs-length", sft(edit(SCHED, ("base_lrs",), [2e-5])),
         ("scheduler.json", "field '_last_lr'", "as long as base_lrs")),
    Case("sched-base-lrs-other-groups", sft(both(*(edit(SCHED, (k,), v * 3) for k, v in
                                                   [("base_lrs", [2e-5]), ("_last_lr", [1e-5]), ("lr_lambdas", [{}])]))),
         ("scheduler.json", "field 'base_lrs' has 3 entries", "optimizer.json has 2 parameter groups")),
    Case("sched-last-epoch-text", sft(edit(SCHED, ("last_epoch",), "1")), ("scheduler.json", "field 'last_epoch'", INT)),
    Case("sched-last-epoch-other-step", sft(both(edit(SCHED, ("last_epoch",), 5), edit(SCHED, ("_step_count",), 6))),
         ("scheduler.json", "field 'last_epoch'", "optimizer_steps of engine.json (1)", "got 5")),
    Case("sched-unknown-attribute", sft(edit(SCHED, ("optimizer",), 1)), ("scheduler.json", "unknown fields",
                                                                          "'optimizer'")),
    # ---- engine.json
    Case("engine-counter-text", sft(edit(ENGINE, ("optimizer_steps",), "1")),
         ("step-1/engine.json", "field 'optimizer_steps'", INT, 'got "1"')),
    Case("engine-counter-negative", sft(edit(ENGINE, ("global_steps",), -1)), ("engine.json", "field 'global_steps'",
                                                                              INT)),
    Case("engine-more-updates-than-steps", sft(edit(ENGINE, ("optimizer_steps",), 7)),
         ("engine.json", "field 'optimizer_steps'", "<= global_steps (1)", "got 7")),
    Case("engine-steps-disagree-with-trainer", sft(both(edit(ENGINE, ("global_steps",), 5), edit(ENGINE, ("micro_steps",), 5))),
         ("engine.json", "field 'global_steps'")),
    Case("engine-zero-stage-out-of-range", sft(edit(ENGINE, ("zero_stage",), 7)),
         ("engine.json", "field 'zero_stage'", "an integer in 0..3", "got 7")),
    Case("engine-zero-stage-without-its-files", sft(edit(ENGINE, ("zero_stage",), 2)),
         ("step-1/optimizer.rank0-of-1", "file not found")),
    Case("engine-dtype-unknown", sft(edit(ENGINE, ("dtype",), "float8")),
         ("engine.json", "field 'dtype'", 'one of "float32", "bfloat16", "float16"', 'got "float8"')),
    Case("engine-world-size-zero", sft(edit(ENGINE, ("world_size",), 0)), ("engine.json", "field 'world_size'",
                                                                          "an integer >= 1")),
    Case("engine-world-size-disagrees", sft(edit(ENGINE, ("world_size",), 2)),
         ("engine.json", "field 'world_size'", "world_size of trainer_state.json (1)", "got 2")),
    # ---- RNG state (rng.rank<R>.json + .safetensors)
    Case("rng-python-wrong-type", sft(edit(RNG, ("python",), "abc")), ("step-1/rng.rank0.json", "field 'python'",
                                                                       "a list of 3 items")),
    Case("rng-python-word-too-big", sft(edit(RNG, ("python", "__tuple__", 1, "__tuple__", 0), 2**32)),
         ("rng.rank0.json", "field 'python[1][0]'", "an integer in 0..4294967295")),
    Case("rng-numpy-key-truncated", sft(edit(RNG, ("numpy", "state", "key"), list(range(100)))),
         ("rng.rank0.json", "field 'numpy.state.key'", "624 items", "got 100 items")),
    Case("rng-numpy-other-generator", sft(edit(RNG, ("numpy", "bit_generator"), "PCG64")),
         ("rng.rank0.json", "field 'numpy.bit_generator'", '"MT19937"')),
    Case("rng-torch-wrong-length", sft(tensor(RNG_T, "0", replace=torch.zeros(100, dtype=torch.uint8))),
         ("rng.rank0.json", "field 'torch'", "shape [5056]", "shape [100]")),
    Case("rng-torch-invalid-state", sft(tensor(RNG_T, "0", replace=torch.zeros(5056, dtype=torch.uint8))),
         ("rng.rank0.json", "not a valid RNG state", "Invalid mt19937 state")),
    Case("rng-file-cut-short", sft(cut(RNG, 300)), ("rng.rank0.json", "not valid JSON")),
    Case("rng-names-missing-tensor", sft(edit(RNG, ("torch", "__tensor__"), "7")),
         ("rng.rank0.json", "field 'torch'", "a tensor in rng.rank0.safetensors", 'got "7"')),
    Case("rng-other-rank-damaged", sft(second_rank_rng), ("rng.rank1.json", "field 'numpy.state.pos'", "got 999")),
    # ---- latest and manifest.json
    Case("latest-not-json", sft(pointer("step-1")), ("checkpoints/latest", "not valid JSON")),
    Case("latest-points-outside", sft(pointer('{"step": 1, "dir": "../../model"}')),
         ("checkpoints/latest", "field 'dir'", "step dir", '"../../model"')),
    Case("latest-absolute-path", sft(pointer('{"step": 1, "dir": "/etc"}')), ("latest", "field 'dir'", '"/etc"')),
    Case("latest-missing-dir", sft(pointer('{"step": 0, "dir": "step-0"}')),
         ("latest", "step-0, which does not exist", "no complete checkpoint is older")),
    Case("latest-step-disagrees", sft(pointer('{"step": 2, "dir": "step-1"}')),
         ("latest", "field 'dir'", '"step-2"', 'got "step-1"')),
    Case("manifest-size-text", sft(manifest(("files", MODEL), "396608")),
         ("step-1/manifest.json", f"field 'files.{MODEL}'", INT)),
    Case("manifest-file-outside", sft(manifest(("files",), {"../../model/config.json": 10})),
         ("manifest.json", "field 'files'", "inside the checkpoint dir", "../../model/config.json")),
    Case("manifest-other-step", sft(manifest(("step",), 3)), ("manifest.json", "field 'step'", "must be 1", "got 3")),
    Case("manifest-wrong-size", sft(manifest(("files", MODEL), 5)), (f"step-1/{MODEL}", "manifest.json lists 5")),
    # ---- tensors: NaN/inf, headers, skeletons
    Case("tensor-model-nan", sft(tensor(MODEL, "model.layers.0.mlp.up_proj.weight", float("nan"))),
         (f"step-1/{MODEL}", "tensor 'model.layers.0.mlp.up_proj.weight' holds NaN")),
    Case("tensor-model-inf", sft(tensor(MODEL, "model.norm.weight", float("-inf"))),
         (MODEL, "tensor 'model.norm.weight' holds inf")),
    Case("tensor-optimizer-nan", sft(tensor("optimizer.safetensors", "1", float("nan"))),
         ("step-1/optimizer.safetensors", "tensor 'state.0.exp_avg' holds NaN")),
    Case("tensor-optimizer-inf", sft(tensor("optimizer.safetensors", "2", float("inf"))),
         ("optimizer.safetensors", "tensor 'state.0.exp_avg_sq' holds inf")),
    Case("tensor-model-aliases-broken", sft(lambda run: _aliases(run, '{"lm_head.weight": "nowhere"}')),
         (MODEL, "metadata 'aliases'", "nowhere")),
    Case("tensor-optimizer-groups-disagree", sft(edit(OPT, ("param_groups",), [])),
         ("scheduler.json", "field 'base_lrs' has 2 entries", "optimizer.json has 0 parameter groups")),
    Case("tensor-optimizer-lr-nan", sft(edit(OPT, ("param_groups", 0, "lr"), {"__float__": "nan"})),
         ("step-1/optimizer.json", "field 'param_groups[0].lr'", F, "got NaN")),
    Case("tensor-optimizer-skeleton-tag", sft(edit(OPT, ("state",), {"__dict__": 5})),
         ("optimizer.json", "field 'state'", "[key, value] pairs")),
]


def _aliases(run: Path, aliases: str) -> None:
    path = step1(run) / MODEL
    scratch = run / "scratch.safetensors"
    save_file(load_file(path), str(scratch), metadata={"aliases": aliases})
    tamper_checkpoint(run, MODEL, scratch.read_bytes())
    scratch.unlink()


# ----------------------------------------------------------------------------- a tiny finished PPO run
def rl_flags(model: Path, prompts: Path, out: Path) -> list[str]:
    return [
        "ppo", "--model.name_or_path", str(model), "--reward", "rater", "--data.datasets", f"[{prompts}]",
        "--data.data_split", "0,0,1", "--run.output_dir", str(out), "--run.progress", "false", "--gold_every", "0",
        "--generation.max_new_tokens", "4", "--rollout_batch_size", "4", "--actor_engine.micro_batch_size", "4",
        "--critic_engine.micro_batch_size", "4", "--max_iterations", "2", "--run.save_every", "1",
        "--ema_beta", "0.5", "--kl_target", "1.0", "--normalize_reward", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def rl_run(tiny_model, tmp_path_factory) -> Path:
    """Two PPO iterations with a critic, the EMA actor, the adaptive KL controller and reward normalisation;
    the checkpoint after the first (step-1) is what the RL cases damage."""
    root = tmp_path_factory.mktemp("rl_run")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in WORDS[:16]))
    assert main(rl_flags(tiny_model, prompts, root / "run")) == 0
    assert (root / "run" / "checkpoints" / "step-1" / "ema.safetensors").is_file()
    return root / "run"


@dataclass
class RLEnv(Env):
    rl_run: Path | None = None

    def rl_resume(self, damage: Damage) -> list[str]:
        run = Path(shutil.copytree(self.rl_run, self.root / "run"))
        damage(run)
        return [*rl_flags(self.model, self.rl_run.parent / "prompts.jsonl", run), "--run.resume", "true"]


def rl(damage: Damage):
    return lambda env: env.rl_resume(damage)


ACTOR_W = "model.layers.1.self_attn.v_proj.weight"
RL_CASES = [
    Case("rl-kl-controller-text", rl(edit(TS, ("extra", "kl_ctl", "value"), "abc")),
         ("step-1/trainer_state.json", "field 'extra.kl_ctl.value'", F, 'got "abc"')),
    Case("rl-kl-controller-missing", rl(edit(TS, ("extra", "kl_ctl"), GONE)),
         ("trainer_state.json", "no 'kl_ctl' state", "resume with the same")),
    Case("rl-normaliser-negative-count", rl(edit(TS, ("extra", "moments", "count"), -4.0)),
         ("trainer_state.json", "field 'extra.moments.count'", "must be a finite number >= 0", "got -4.0")),
    Case("rl-ema-nan", rl(tensor("ema.safetensors", ACTOR_W, float("nan"))),
         ("step-1/ema.safetensors", f"tensor '{ACTOR_W}' holds NaN")),
    Case("rl-ema-other-shape", rl(tensor("ema.safetensors", ACTOR_W, replace=torch.zeros(3, 3))),
         ("ema.safetensors", f"tensor '{ACTOR_W}'", "got a F32 tensor of shape [3, 3]", "the model the checkpoint")),
    Case("rl-critic-head-inf", rl(tensor("critic/model.safetensors", "model.score.weight", float("inf"))),
         ("step-1/critic/model.safetensors", "tensor 'model.score.weight' holds inf")),
]


@pytest.fixture
def rl_env(env, rl_run) -> RLEnv:
    return RLEnv(env.root, env.model, env.narrow_model, env.sft_run, rl_run)


@pytest.mark.parametrize("case", [param(c) for c in SFT_CASES])
def test_damaged_sft_checkpoint_is_refused_before_anything_changes(case, env, capsys):
    check_case(case, env, capsys)


@pytest.mark.parametrize("case", [param(c) for c in RL_CASES])
def test_damaged_rl_checkpoint_is_refused_before_anything_changes(case, rl_env, capsys):
    check_case(case, rl_env, capsys)


def test_tables_cover_every_state_file():
    cases = SFT_CASES + RL_CASES
    assert len(SFT_CASES) >= 35 and len(RL_CASES) >= 2 and len({c.id for c in cases}) == len(cases)
    kinds = {c.id.split("-")[0] for c in cases}
    assert {"state", "sched", "engine", "rng", "latest", "manifest", "tensor", "rl"} <= kinds
