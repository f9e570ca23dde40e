"""One CLI grammar: every validation error names a flag the command really has, and old spellings name the new one.

The walk sets each numeric option of every command's config, one at a time, to values that break a rule
(-1, 0, a huge negative number, NaN) and collects the ConfigError messages: each must name at least one
``--flag``, and every ``--flag`` it names must be one that ``chatrlhf <command> --help`` lists.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing

import pytest

from chatrlhf import cli, cli_errors
from chatrlhf.config import ConfigError

VALID_BASE = {"ppo": {"reward": "rater"}, "grpo": {"reward": "rater"}, "pairs": {"input": ["ratings.jsonl"]}}
"""Options a command needs before its defaults validate (the rest of its defaults are valid)."""
BAD_VALUES = (-1, 0, -1e9, math.nan)
FLAG = re.compile(r"--([a-z_][\w.]*[a-z_0-9])")


def numeric_paths(cls, prefix: str = "") -> list[str]:
    """Dotted paths of every int/float option of a config dataclass (nested sections included)."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            paths += numeric_paths(hint, f"{prefix}{f.name}.")
        elif hint in (int, float) or set(typing.get_args(hint)) in ({int, type(None)}, {float, type(None)}):
            paths.append(f"{prefix}{f.name}")
    return paths


def with_value(cfg, path: str, value):
    cfg = copy.deepcopy(cfg)
    *sections, name = path.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)
    return cfg


def error_messages(command: str) -> dict[str, str]:
    cls = cli._config_class(command)
    base = cls(**VALID_BASE.get(command, {}))
    base.validate()  # the defaults (with VALID_BASE) are a valid command line
    messages = {}
    for path in numeric_paths(cls):
        for value in BAD_VALUES:
            try:
                with_value(base, path, value).validate()
            except ConfigError as err:
                messages[f"{path}={value}"] = str(err)
    return messages


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_error_names_a_flag_of_the_command(command):
    flags = set(cli_errors.flag_names(cli._config_class(command)))
    messages = error_messages(command)
    assert messages, f"no option of {command} is ever refused: the walk found nothing to check"
    for case, message in messages.items():
        named = FLAG.findall(message)
        assert named, f"{command} {case}: the error names no flag: {message}"
        unknown = [n for n in named if n not in flags]
        assert not unknown, f"{command} {case}: names --{unknown[0]}, which `--help` does not list: {message}"


def test_the_walk_covers_the_stage_sections():
    """The pipeline's errors name its nested sections (the bug this guards: a hard-coded ``engine.`` prefix)."""
    named = {n for m in error_messages("train").values() for n in FLAG.findall(m)}
    for flag in ("sft.engine.learning_rate", "rm.engine.micro_batch_size", "ppo.actor_engine.learning_rate",
                 "ppo.critic_engine.max_grad_norm", "ppo.rollout_batch_size",
                 "run.save_every", "eval.batch_size", "feedback.min_margin", "sft.epochs"):
        assert flag in named, flag
    ppo = {n for m in error_messages("ppo").values() for n in FLAG.findall(m)}
    assert {"actor_engine.learning_rate", "critic_engine.micro_batch_size", "generation.max_new_tokens"} <= ppo


@pytest.mark.parametrize("command,old", [(c, o) for c, table in cli.RENAMED.items() for o in table])
def test_old_spellings_name_the_new_option(command, old):
    new = cli.RENAMED[command][old].split()[0]
    assert new in cli_errors.flag_names(cli._config_class(command))
    with pytest.raises(ConfigError, match=re.escape(f"--{old} is an old spelling: use --{new}")):
        cli.parse([command, f"--{old}", "1"])


def test_old_keys_in_a_config_file_name_the_new_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("output_dir: outputs/x\nsft_engine:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"'output_dir' in --config .* write it as 'run.output_dir'"):
        cli.parse(["train", "--config", str(path)])


def test_new_options_that_start_like_old_ones_parse(tmp_path):
    db = tmp_path / "f.db"
    _, cfg = cli.parse(["train", "--feedback.db", str(db), "--run.output_dir", "x", "--sft.engine.learning_rate",
                        "3e-5", "--eval.limit", "4"])
    assert (cfg.feedback.db, cfg.run.output_dir, cfg.sft.engine.learning_rate, cfg.eval.limit) == (str(db), "x",
                                                                                                  3e-5, 4)
    _, chat = cli.parse(["chat", "--model.name_or_path", "m", "--generation.temperature", "0"])
    assert (chat.model.name_or_path, chat.generation.sampling().do_sample) == ("m", False)


def test_estimator_names_are_written_once():
    from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from chatrlhf.pipeline_config import AlgoName
    from chatrlhf.stages.ppo_config import EstimatorName

    assert set(typing.get_args(EstimatorName)) == set(ADVANTAGE_ESTIMATORS)
    assert set(typing.get_args(AlgoName)) == set(ADVANTAGE_ESTIMATORS) - {"gae"} | {"ppo", "dpo"}
