"""Hostile configs, flags and model dirs: YAML that repeats a key, expands an alias bomb or nests too deep;
numbers that are infinite, NaN, beyond 64 bits or out of range, from a YAML file or a flag (negative values
included); model dirs whose config.json describes an absurd model; errors inside ``train`` naming the stage's
flags; and weights that turn NaN, which are never saved.

Each table case runs through ``hostile.check_case``: exit 2, no traceback, one error line naming the file,
line, key or flag and the fix, nothing on disk changed.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from hostile import Case, check_case, copy_rows, param, run_cli

pytestmark = pytest.mark.slow

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))  # 9**7 values from ~400 bytes


def yaml_case(case_id: str, text: str, expect: tuple[str, ...], command: str = "sft") -> Case:
    def build(env):
        path = env.write("cfg.yaml", text) if isinstance(text, str) else None
        if path is None:
            path = env.root / "cfg.yaml"
            path.write_bytes(text)
        argv = env.sft("--config", str(path)) if command == "sft" else env.rl(command, "--reward", "rater",
                                                                              "--config", str(path))
        return argv

    return Case(f"yaml-{case_id}", build, expect)


def flag_case(case_id: str, flags: tuple[str, ...], expect: tuple[str, ...], command: str = "sft") -> Case:
    def build(env):
        return env.sft(*flags) if command == "sft" else env.rl(command, "--reward", "rater", *flags)

    return Case(f"flag-{case_id}", build, expect)


def model_case(case_id: str, edit: dict, expect: tuple[str, ...]) -> Case:
    def build(env):
        model = env.model_copy()
        config = json.loads((model / "config.json").read_text())
        config.update(edit)
        (model / "config.json").write_text(json.dumps(config))
        return env.sft(model=model)

    return Case(f"model-{case_id}", build, expect)


FINITE = ("must be a finite number", "Fix: give a number")  # a flag's value, checked with the config
NOT_FINITE = ("is not a finite number", "Fix: write a finite number")  # a YAML value, refused as it is read
BEYOND = ("beyond 64 bits", "Fix: give an integer")
HUGE = str(2**70)

CASES = [
    # ---- YAML files: keys twice, aliases, depth, encodings
    yaml_case("duplicate-key", "engine:\n  learning_rate: 1.0e-5\n  learning_rate: 2.0e-5\n",
              ("cfg.yaml line 3", "'learning_rate' appears twice", "first at line 2", "Fix: keep one")),
    yaml_case("duplicate-section", "engine:\n  seed: 1\nrun:\n  log_every: 1\nengine:\n  seed: 2\n",
              ("cfg.yaml line 5", "'engine' appears twice", "first at line 1")),
    yaml_case("duplicate-in-flow", "engine: {seed: 1, seed: 2}\n", ("cfg.yaml line 1", "'seed' appears twice")),
    yaml_case("alias-bomb", BOMB, ("cfg.yaml", "aliases", "expand to more than 100,000", "Fix:")),
    yaml_case("alias-bomb-in-list-field", BOMB + "data:\n  datasets: *g\n", ("cfg.yaml", "expand to more than")),
    yaml_case("recursive-alias", "data:\n  datasets: &x [a, *x]\n", ("cfg.yaml", "refer to themselves")),
    yaml_case("nested-deep", "data:\n  datasets: " + "[" * 5000 + "]" * 5000 + "\n", ("cfg.yaml", "nested deeper")),
    yaml_case("nested-150", "engine:\n  seed: " + "[" * 150 + "1" + "]" * 150 + "\n",
              ("cfg.yaml", "nested deeper than 100")),
    yaml_case("not-utf8", b"engine:\n  seed: 1\n  # caf\xe9\n", ("cfg.yaml line 3, column 8", "not UTF-8",
                                                                  "save the file as UTF-8")),
    yaml_case("binary", bytes(range(256)), ("cfg.yaml", "not UTF-8")),
    yaml_case("surrogate", 'run:\n  output_dir: "out\\ud800"\n', ("cfg.yaml", "'run.output_dir'", "lone UTF-16 surrogate")),
    yaml_case("python-tag", "engine: !!python/object/apply:os.system [echo PWNED]\n",
              ("cfg.yaml is not valid YAML", "line 1", "Fix: correct the YAML")),
    yaml_case("non-scalar-key", "? [a, b]\n: 1\n", ("cfg.yaml line 1", "mapping key must be a plain value")),
    # ---- YAML numbers
    yaml_case("lr-inf", "engine:\n  learning_rate: .inf\n", ("cfg.yaml, field 'engine.learning_rate'", *NOT_FINITE)),
    yaml_case("lr-nan", "engine:\n  learning_rate: .nan\n", ("cfg.yaml, field 'engine.learning_rate'", *NOT_FINITE)),
    yaml_case("grad-norm-inf", "engine:\n  max_grad_norm: .inf\n", ("field 'engine.max_grad_norm'", *NOT_FINITE)),
    yaml_case("betas-nan", "engine:\n  adam_betas: [.nan, 0.9]\n", ("field 'engine.adam_betas[0]'", *NOT_FINITE)),
    yaml_case("eval-fraction-nan", "data:\n  eval_fraction: .nan\n", ("field 'data.eval_fraction'", *NOT_FINITE)),
    yaml_case("weights-inf", "data:\n  weights: [.inf]\n", ("field 'data.weights[0]'", *NOT_FINITE)),
    yaml_case("seed-huge", f"engine:\n  seed: {HUGE}\n", ("cfg.yaml, field 'engine.seed'", "beyond 64 bits")),
    yaml_case("max-len-huge", f"data:\n  max_len: {HUGE}\n", ("field 'data.max_len'", "beyond 64 bits")),
    yaml_case("ppo-kl-coef-nan", "kl_coef: .nan\n", ("field 'kl_coef'", *NOT_FINITE), command="ppo"),
    yaml_case("ppo-clip-inf", "clip_eps: .inf\n", ("field 'clip_eps'", *NOT_FINITE), command="ppo"),
    yaml_case("grpo-temperature-inf", "generation:\n  temperature: .inf\n", ("field 'generation.temperature'",
                                                                              *NOT_FINITE), command="grpo"),
    # ---- flags
    flag_case("lr-negative-exponent", ("--engine.learning_rate", "-1e-3"), ("--engine.learning_rate", "must be > 0",
                                                                          "got -0.001")),
    flag_case("lr-inf", ("--engine.learning_rate", "inf"), ("--engine.learning_rate", "'inf'")),
    flag_case("lr-nan", ("--engine.learning_rate=nan",), ("--engine.learning_rate", "'nan'")),
    flag_case("lr-negative-inf", ("--engine.learning_rate", "-inf"), ("--engine.learning_rate", "'-inf'")),
    flag_case("seed-huge", ("--engine.seed", HUGE), ("--engine.seed", *BEYOND)),
    flag_case("micro-batch-huge", ("--engine.micro_batch_size", HUGE), ("--engine.micro_batch_size", *BEYOND)),
    flag_case("betas-above-1", ("--engine.adam_betas", "[1.5, 0.9]"), ("--engine.adam_betas", "[0, 1)", "got (1.5")),
    flag_case("betas-negative", ("--engine.adam_betas", "[-0.1, 0.9]"), ("--engine.adam_betas", "[0, 1)")),
    flag_case("eps-zero", ("--engine.adam_eps", "0"), ("--engine.adam_eps", "must be > 0")),
    flag_case("weight-decay-negative", ("--engine.weight_decay", "-1"), ("--engine.weight_decay", "must be >= 0")),
    flag_case("lora-alpha-inf", ("--model.lora_r", "4", "--model.lora_alpha", "inf"), ("--model.lora_alpha",)),
    flag_case("weights-inf", ("--data.weights", "[.inf]"), ("--data.weights value, field '[0]'", *NOT_FINITE)),
    flag_case("weights-huge", ("--data.weights", "[1e999]"), ("--data.weights[0]", *FINITE)),  # YAML 1.1: a string
    flag_case("datasets-alias-bomb", ("--data.datasets", BOMB.replace("\n", ", ").join("{}")),
              ("--data.datasets value", "expand to more than")),
    flag_case("datasets-recursive", ("--data.datasets", "&a [x, *a]"), ("--data.datasets value", "refer to themselves")),
    flag_case("datasets-deep", ("--data.datasets", "[" * 3000 + "]" * 3000), ("--data.datasets value", "nested deeper")),
    flag_case("ppo-kl-coef-negative-exp", ("--kl_coef", "-1e-2"), ("--kl_coef must be >= 0", "got -0.01"),
              command="ppo"),
    flag_case("ppo-clip-zero", ("--clip_eps", "0"), ("--clip_eps must be > 0",), command="ppo"),
    flag_case("grpo-reward-clip-negative", ("--reward_clip", "-5"), ("--reward_clip must be > 0", "or null"),
              command="grpo"),
    flag_case("ppo-max-new-tokens-huge", ("--generation.max_new_tokens", HUGE), ("--generation.max_new_tokens",
                                                                                  *BEYOND), command="ppo"),
    flag_case("config-inline-duplicate", ("--config", "{engine: {seed: 1, seed: 2}}"),
              ("--config (inline)", "'seed' appears twice")),
    # ---- model dirs described absurdly in config.json
    model_case("200k-layers", {"num_hidden_layers": 200_000, "hidden_size": 4096, "intermediate_size": 11008},
               ("config.json describes a model of about", "GiB", "num_hidden_layers=200000", "Fix: check those sizes")),
    model_case("huge-vocab", {"vocab_size": 2**40}, ("config.json describes a model", "vocab_size=1099511627776")),
    model_case("hidden-negative", {"hidden_size": -64}, ("config.json", "'hidden_size' must be a positive integer",
                                                         "got -64")),
    model_case("hidden-string", {"hidden_size": "64"}, ("config.json", "'hidden_size' must be a positive integer")),
    model_case("layers-zero", {"num_hidden_layers": 0}, ("'num_hidden_layers' must be a positive integer", "got 0")),
    model_case("layers-float", {"num_hidden_layers": 2.5}, ("'num_hidden_layers' must be a positive integer",)),
]


@pytest.mark.parametrize("case", [param(c) for c in CASES])
def test_hostile_config_fails_clearly_and_overwrites_nothing(case, env, capsys):
    check_case(case, env, capsys)


def test_alias_bomb_is_refused_fast_and_small(env, capsys):
    """The 400-byte bomb used to cost ~26 s and a gigabyte before any error; now it is refused unexpanded."""
    import time

    path = env.write("bomb.yaml", BOMB)
    t0 = time.perf_counter()
    code, stderr = run_cli(env.sft("--config", str(path)), capsys)
    assert code == 2 and time.perf_counter() - t0 < 10, stderr
    assert len(stderr.strip().splitlines()[-1]) < 400


def test_errors_inside_train_name_the_stage_section(env, capsys):
    data = env.jsonl("few.jsonl", copy_rows(6))
    code, stderr = run_cli(["train", "--preset", "smoke", "--data.datasets", f"[{data}]", "--data.data_split", "1,0,0",
                            "--run.output_dir", str(env.root / "pipe"), "--run.progress", "false"], capsys)
    line = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert code == 2 and len(line) == 1, stderr
    assert "stage sft:" in line[0] and "--sft.engine.micro_batch_size=8" in line[0], line[0]


def _digest(root) -> dict:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_weights_that_turn_nan_are_never_saved_over_a_good_model(env, capsys):
    """A finite but absurd learning rate (1e39 overflows float32) makes the weights inf/NaN: the run exits
    non-zero and the finished model it was told to overwrite is byte for byte the same."""
    run = env.run_copy()
    before = _digest(run / "model")
    argv = env.sft("--engine.learning_rate", "1e39", "--run.overwrite", "true", "--run.save_every", "0")
    argv[argv.index("--run.output_dir") + 1] = str(run)
    code, stderr = run_cli(argv, capsys)
    line = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert code == 1 and len(line) == 1, stderr
    assert "final weights hold NaN or inf" in line[0] and "nothing was saved" in line[0], line[0]
    assert _digest(run / "model") == before
    # The overwrite run removed the earlier run's checkpoints, so resuming cannot continue that run by mistake.
    code, stderr = run_cli([*argv[:argv.index("--run.overwrite")], "--run.resume", "true"], capsys)
    assert code == 2 and "holds no complete checkpoint" in stderr and "finished model" in stderr, stderr
    assert _digest(run / "model") == before
