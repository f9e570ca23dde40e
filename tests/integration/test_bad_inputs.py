"""Malformed inputs, one table: data files, YAML configs, CLI flags, model dirs and checkpoints.

Each case runs through ``hostile.check_case``: exit status 2, no traceback, one error line naming what is
wrong (file, line, field or flag) and how to fix it, nothing on disk changed, no planted pickle run. A few
cases also run as a real process. More tables, by class of input: test_hostile_*.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hostile import (
    MARKER,
    WORDS,
    Case,
    Env,
    check_case,
    copy_rows,
    param,
    pickle_bytes,
    plant_pickle,
    sft_flags,
    tamper_checkpoint,
)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the builders
def _pairs(n: int = 8) -> list[dict]:
    return [{"prompt": f"say {w}", "chosen": f"{w} good", "rejected": f"{w} bad"} for w in WORDS[:n]]


def _ratings(n: int = 8) -> list[dict]:
    return [{"prompt": f"say {w}", "response": f"{w} {s}", "score": 1 + (i + s) % 5}
            for i, w in enumerate(WORDS[:n]) for s in (0, 2)]


def b_data_missing(env):
    return env.sft(data=env.root / "nope.jsonl")


def b_data_broken_line(env):
    rows = copy_rows(4)
    return env.sft(data=env.jsonl("bad.jsonl", [rows[0], rows[1], '{"prompt": "copy: a", "response": ', rows[3]]))


def b_data_missing_field(env):
    rows = copy_rows(8)
    del rows[1]["response"]
    return env.sft(data=env.jsonl("rows.jsonl", rows))


def b_data_number(env):
    rows = copy_rows(8)
    rows[1]["response"] = 42
    return env.sft(data=env.jsonl("rows.jsonl", rows))


def b_data_list(env):
    rows = copy_rows(8)
    rows[2]["response"] = ["a", "b"]
    return env.sft(data=env.jsonl("rows.jsonl", rows))


def b_data_empty(env):
    return env.sft(data=env.write("empty.jsonl", ""))


def b_rm_identical(env):
    rows = _pairs()
    rows[1]["rejected"] = rows[1]["chosen"]
    data = env.jsonl("pairs.jsonl", rows)
    return ["rm", "--model.name_or_path", str(env.model), "--data.datasets", f"[{data}]", "--data.data_split",
            "0,1,0", "--run.output_dir", str(env.root / "out"), "--run.progress", "false"]


def b_dpo_no_rejected(env):
    rows = _pairs()
    del rows[2]["rejected"]
    data = env.jsonl("pairs.jsonl", rows)
    return ["dpo", "--model.name_or_path", str(env.model), "--data.datasets", f"[{data}]", "--data.data_split",
            "0,1,0", "--run.output_dir", str(env.root / "out"), "--run.progress", "false"]


def b_rm_rating_range(env):
    rows = _ratings()
    rows[3]["score"] = 7
    data = env.jsonl("ratings.jsonl", rows)
    return ["rm", "--objective", "ratings", "--model.name_or_path", str(env.model), "--data.datasets", f"[{data}]",
            "--data.data_split", "0,1,0", "--run.output_dir", str(env.root / "out"), "--run.progress", "false"]


def b_ppo_empty_prompt(env):
    data = env.jsonl("prompts.jsonl", [{"prompt": "say hello"}, {"prompt": "   "}, {"prompt": "say yes"}])
    return env.rl("ppo", "--reward", "rater", "--data.datasets", f"[{data}]")


def b_pairs_bad_score(env):
    rows = _ratings()
    rows[1]["score"] = "great"
    return ["pairs", "--input", f"[{env.jsonl('ratings.jsonl', rows)}]", "--output", str(env.root / "pairs.jsonl")]


def b_pairs_no_score(env):
    rows = _ratings()
    del rows[0]["score"]
    return ["pairs", "--input", f"[{env.jsonl('ratings.jsonl', rows)}]", "--output", str(env.root / "pairs.jsonl")]


def b_pairs_output_exists(env):
    out = env.jsonl("pairs.jsonl", _pairs(2))  # an earlier result that must survive
    return ["pairs", "--input", f"[{env.jsonl('ratings.jsonl', _ratings())}]", "--output", str(out)]


def b_yaml_missing(env):
    return env.sft("--config", str(env.root / "nope.yaml"))


def b_yaml_syntax(env):
    return env.sft("--config", str(env.write("bad.yaml", "engine:\n  learning_rate: [1e-5\nrun: {}\n")))


def b_yaml_unknown_key(env):
    return env.sft("--config", str(env.write("unk.yaml", "engine:\n  learning_rat: 1.0e-5\n")))


def b_yaml_wrong_type(env):
    return env.sft("--config", str(env.write("type.yaml", "engine:\n  learning_rate: fast\n")))


def b_yaml_list(env):
    return env.sft("--config", str(env.write("list.yaml", "- engine\n- run\n")))


def b_flag_unknown(env):
    return env.sft("--engine.learning_rat", "1")


def b_flag_zero_stage(env):
    return env.sft("--engine.zero_stage", "5")


def b_flag_micro_batch(env):
    return env.sft("--engine.micro_batch_size", "0")


def b_flag_lr(env):
    return env.sft("--engine.learning_rate", "-1")


def b_flag_keep_last(env):
    return env.sft("--run.keep_last", "0")


def b_flag_data_split(env):
    return env.sft("--data.data_split", "1,2")


def b_train_algo(env):
    return ["train", "--algo", "nope", "--run.output_dir", str(env.root / "out")]


def b_train_preset(env):
    return ["train", "--preset", "nope", "--run.output_dir", str(env.root / "out")]


def b_grpo_one_sample(env):
    return env.rl("grpo", "--reward", "rater", "--samples_per_prompt", "1")


def b_ppo_kl_in(env):
    return env.rl("ppo", "--reward", "rater", "--kl_in", "nope")


def b_grpo_dual_clip(env):
    return env.rl("grpo", "--reward", "rater", "--dual_clip", "0.5")


def b_grpo_overlong_buffer(env):
    return env.rl("grpo", "--reward", "rater", "--overlong_buffer", "500")


def b_dr_grpo_loss_agg(env):
    return env.rl("grpo", "--reward", "rater", "--advantage_estimator", "dr_grpo", "--loss_agg", "seq-mean-token-mean")


def b_ppo_reward_file(env):
    return env.rl("ppo", "--advantage_estimator", "reinforce", "--reward", f"{env.root / 'missing.py'}:score")


def b_ppo_reward_function(env):
    file = env.write("rewards.py", "def score(prompt, response, metadata):\n    return 1.0\n")
    return env.rl("ppo", "--advantage_estimator", "reinforce", "--reward", f"{file}:not_there")


def b_output_has_model(env):
    run = env.run_copy()
    data = env.jsonl("copy.jsonl", copy_rows(16))
    return ["sft", *sft_flags(env.model, data, run)]


def b_train_output_has_run(env):
    root = env.root / "pipeline"
    shutil.copytree(env.sft_run, root / "sft")
    (root / "config.yaml").write_text("# the earlier run's resolved config\n")
    data = env.jsonl("copy.jsonl", copy_rows(16))
    return ["train", "--run.output_dir", str(root), "--model.name_or_path", str(env.model), "--data.datasets",
            f"[{data}]", "--eval.enabled", "false", "--run.progress", "false"]


def b_model_missing(env):
    return env.sft(model=env.root / "no_such_model")


def b_model_no_config(env):
    model = env.model_copy()
    (model / "config.json").unlink()
    return env.sft(model=model)


def b_model_config_not_json(env):
    model = env.model_copy()
    (model / "config.json").write_text('{"model_type": "llama",')
    return env.sft(model=model)


def b_model_truncated(env):
    model = env.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return env.sft(model=model)


def b_model_auto_map(env):
    model = env.model_copy()
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(f"open({str(env.root / MARKER)!r}, 'w')\n")
    return env.sft(model=model)


def b_model_pickle(env):
    model = env.model_copy()
    (model / "model.safetensors").unlink()
    plant_pickle(env, model / "pytorch_model.bin")
    return env.sft(model=model)


def b_ckpt_pickle_model(env):
    run = env.run_copy()
    tamper_checkpoint(run, "model.safetensors", pickle_bytes(env))
    return env.resume(run)


def b_ckpt_pickle_optimizer(env):
    run = env.run_copy()
    tamper_checkpoint(run, "optimizer.safetensors", pickle_bytes(env))
    return env.resume(run)


def b_ckpt_state_unknown_field(env):
    run = env.run_copy()
    state = json.loads((run / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    tamper_checkpoint(run, "trainer_state.json", json.dumps({**state, "bogus": 1}).encode())
    return env.resume(run)


def b_ckpt_state_not_json(env):
    run = env.run_copy()
    tamper_checkpoint(run, "trainer_state.json", b'{"step": 1,')
    return env.resume(run)


def b_ckpt_no_engine_json(env):
    run = env.run_copy()
    tamper_checkpoint(run, "engine.json", None)
    return env.resume(run)


def b_ckpt_zero_stage(env):
    return env.resume(env.run_copy(), "--engine.zero_stage", "1")


def b_ckpt_other_shape(env):
    return env.resume(env.run_copy(), model=env.narrow_model)


def b_ckpt_resume_finished_without_checkpoint(env):
    run = env.run_copy()
    shutil.rmtree(run / "checkpoints")
    return env.resume(run)


def b_ckpt_fresh_run_over_checkpoints(env):
    run = env.run_copy()
    shutil.rmtree(run / "model")  # an interrupted run: checkpoints, no final model
    return ["sft", *sft_flags(env.model, env.jsonl("copy.jsonl", copy_rows(16)), run)]


CASES = [
    # ---- data files
    Case("data-missing-file", b_data_missing, ("nope.jsonl", "does not exist", "check the path")),
    Case("data-broken-json-line", b_data_broken_line, ("bad.jsonl line 3", "not valid JSON", "one JSON object per line")),
    Case("data-row-missing-field", b_data_missing_field, ("rows.jsonl line 2", "'response", "Fix: add the column")),
    Case("data-field-is-number", b_data_number, ("rows.jsonl line 2", "field 'response'", "got int", "as text")),
    Case("data-field-is-list", b_data_list, ("rows.jsonl line 3", "field 'response'", "got list", "as text")),
    Case("data-empty-file", b_data_empty, ("empty.jsonl", "has no rows", "non-empty")),
    Case("rm-chosen-equals-rejected", b_rm_identical, ("pairs.jsonl line 2", "identical", "data.bad_rows=skip")),
    Case("dpo-missing-rejected", b_dpo_no_rejected, ("pairs.jsonl line 3", "'rejected'", "Fix: add the column")),
    Case("rm-rating-out-of-range", b_rm_rating_range, ("ratings.jsonl line 4", "score 7", "1..5", "num_levels")),
    Case("ppo-empty-prompt", b_ppo_empty_prompt, ("prompts.jsonl line 2", "field 'prompt'", "empty", "fill in")),
    Case("pairs-score-not-numeric", b_pairs_bad_score, ("ratings.jsonl line 2", "'score'", "not numeric",
                                                         "store a number")),
    Case("pairs-score-missing", b_pairs_no_score, ("ratings.jsonl line 1", "'score'", "Fix: add the column")),
    Case("pairs-output-exists", b_pairs_output_exists, ("pairs.jsonl already exists", "--overwrite true")),
    # ---- YAML configs
    Case("yaml-missing", b_yaml_missing, ("--config", "nope.yaml does not exist", "YAML file")),
    Case("yaml-syntax-error", b_yaml_syntax, ("bad.yaml is not valid YAML", "line 3", "Fix: correct the YAML")),
    Case("yaml-unknown-key", b_yaml_unknown_key, ("'engine.learning_rat'", "unk.yaml",
                                                  "Did you mean engine.learning_rate?")),
    Case("yaml-wrong-type", b_yaml_wrong_type, ("'engine.learning_rate' in --config", "type.yaml", "'fast'", "float")),
    Case("yaml-is-a-list", b_yaml_list, ("list.yaml holds a YAML list", "mapping", "Fix:")),
    # ---- CLI flags
    Case("flag-unknown", b_flag_unknown, ("--engine.learning_rat", "Did you mean --engine.learning_rate?",
                                          "chatrlhf sft --help")),
    Case("flag-zero-stage-5", b_flag_zero_stage, ("--engine.zero_stage", "'5'", "one of 0, 1, 2, 3")),
    Case("flag-micro-batch-0", b_flag_micro_batch, ("engine.micro_batch_size", "must be >= 1", "got 0")),
    Case("flag-negative-lr", b_flag_lr, ("engine.learning_rate", "must be > 0", "got -1")),
    Case("flag-keep-last-0", b_flag_keep_last, ("run.keep_last", "must be >= 1", "got 0")),
    Case("flag-data-split-arity", b_flag_data_split, ("data.data_split='1,2'", "2 parts, not 3",
                                                      "data.data_split=2,4,4")),
    Case("train-unknown-algo", b_train_algo, ("--algo", "'nope'", "'grpo'", "'dpo'")),
    Case("train-unknown-preset", b_train_preset, ("--preset 'nope'", "smoke")),
    Case("grpo-one-sample", b_grpo_one_sample, ("samples_per_prompt >= 2", "got 1")),
    Case("ppo-bad-kl-in", b_ppo_kl_in, ("--kl_in", "'nope'", "'reward', 'loss'")),
    Case("grpo-dual-clip-below-one", b_grpo_dual_clip, ("--dual_clip", "> 1", "0.5")),
    Case("grpo-overlong-buffer-past-max", b_grpo_overlong_buffer, ("--overlong_buffer", "500",
                                                                   "--generation.max_new_tokens")),
    Case("dr-grpo-with-loss-agg", b_dr_grpo_loss_agg, ("--advantage_estimator dr_grpo", "--loss_agg at token-mean")),
    Case("ppo-reward-file-missing", b_ppo_reward_file, ("missing.py does not exist", "FILE.py:function")),
    Case("ppo-reward-function-missing", b_ppo_reward_function, ("no function 'not_there'", "define not_there(")),
    Case("output-dir-holds-model", b_output_has_model, ("already holds a finished model", "--run.overwrite true",
                                                        "--run.resume true")),
    Case("train-output-dir-holds-run", b_train_output_has_run, ("pipeline/sft", "finished", "--run.overwrite true",
                                                                "--run.resume true")),
    # ---- model dirs
    Case("model-missing", b_model_missing, ("no_such_model does not exist", "built-in name")),
    Case("model-no-config", b_model_no_config, ("has no config.json", "model/ subdir")),
    Case("model-config-not-json", b_model_config_not_json, ("config.json is not valid JSON", "Fix: restore")),
    Case("model-weights-truncated", b_model_truncated, ("model.safetensors is not a readable safetensors file",
                                                        "truncated or corrupt", "Fix: copy it again")),
    Case("model-remote-code", b_model_auto_map, ("config.json has 'auto_map'", "--model.trust_remote_code true")),
    Case("model-pickled-weights", b_model_pickle, ("pytorch_model.bin", "refused", "Fix: use a safetensors copy")),
    # ---- checkpoints (resume from a copy of a finished run)
    Case("ckpt-pickle-as-model", b_ckpt_pickle_model, ("step-1/model.safetensors", "not a valid safetensors file",
                                                       "--run.resume")),
    Case("ckpt-pickle-as-optimizer", b_ckpt_pickle_optimizer, ("step-1/optimizer.safetensors",
                                                               "not a valid safetensors file", "--run.resume")),
    Case("ckpt-state-unknown-field", b_ckpt_state_unknown_field, ("trainer_state.json", "unknown fields",
                                                                  "'bogus'", "--run.resume")),
    Case("ckpt-state-not-json", b_ckpt_state_not_json, ("trainer_state.json", "not valid JSON")),
    Case("ckpt-no-engine-json", b_ckpt_no_engine_json, ("step-1: no engine.json", "--run.resume")),
    Case("ckpt-other-zero-stage", b_ckpt_zero_stage, ("ZeRO stage 0", "engine.zero_stage=1", "same stage")),
    Case("ckpt-finished-nothing-to-resume", b_ckpt_resume_finished_without_checkpoint,
         ("no complete checkpoint", "finished model", "--run.overwrite true")),
    Case("ckpt-new-run-over-old-checkpoints", b_ckpt_fresh_run_over_checkpoints,
         ("holds checkpoints of an earlier run", "--run.resume true", "--run.overwrite true")),
    Case("ckpt-other-model-shape", b_ckpt_other_shape, ("model.safetensors", "size mismatch",
                                                        "the model the checkpoint was trained from")),
]




@pytest.mark.parametrize("case", [param(c) for c in CASES])
def test_bad_input_fails_clearly_and_overwrites_nothing(case, env, capsys):
    check_case(case, env, capsys)


def test_table_covers_every_kind_of_input():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    kinds = {c.id.split("-")[0] for c in CASES}
    assert {"data", "yaml", "flag", "model", "ckpt"} <= kinds


# ----------------------------------------------------------------------------- real processes
SUBPROCESS_CASES = ["flag-unknown", "yaml-wrong-type", "flag-micro-batch-0"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process_exits_non_zero_with_one_line(case_id, tmp_path, tiny_model, narrow_model,
                                                                  sft_run):
    case = next(c for c in CASES if c.id == case_id)
    argv = case.build(Env(tmp_path, tiny_model, narrow_model, sft_run))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chatrlhf.cli", *argv], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chatrlhf {argv[0]}: error: "), proc.stderr
    assert all(part in lines[0] for part in case.expect), lines[0]
