"""The ``chatrlhf`` command: one subcommand per stage, each a thin call into ``chatrlhf.stages``.

Every option of a stage's typed config is a flag (``--engine.learning_rate 1e-5``); ``--config FILE.yaml``
loads any of them from YAML first, and flags given after it override it. ``--preset NAME`` loads a
shipped YAML preset (see ``chatrlhf/presets/``) the same way. ``chatrlhf launch [options] -- <command> ...``
runs a command on several processes, GPUs or nodes through DeepSpeed's launcher (``chatrlhf.launch``).

A mistake in the flags, a YAML file, the data, a model dir or a checkpoint ends the command with one line
on stderr (``chatrlhf <command>: error: ...``) that names what is wrong and how to fix it, and exit
status 2; a run stopped by NaN/inf losses exits with 1.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from argparse import ArgumentError
from importlib import resources

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from chatrlhf import cli_errors
from chatrlhf.config import ConfigError, check_numbers

EXIT_INPUT_ERROR = 2
"""Flags, YAML, data, model dirs or checkpoints are wrong: fix the input and run again."""
EXIT_NONFINITE = 1
"""The run stopped on NaN/inf losses or gradients (``FloatingPointError``)."""


def _presets() -> dict[str, str]:
    root = resources.files("chatrlhf") / "presets"
    return {p.name.removesuffix(".yaml"): str(p) for p in root.iterdir() if p.name.endswith(".yaml")}


def _expand_preset(argv: list[str]) -> list[str]:
    """``--preset NAME`` -> ``--config <shipped file>`` in place, so later flags still override it."""
    out = []
    it = iter(argv)
    for arg in it:
        if arg == "--preset" or arg.startswith("--preset="):
            name = next(it, None) if arg == "--preset" else arg.split("=", 1)[1]
            presets = _presets()
            if name not in presets:
                raise ConfigError(f"unknown --preset {name!r}. Fix: use one of: {', '.join(sorted(presets))}")
            out += ["--config", presets[name]]
        else:
            out.append(arg)
    return out


COMMANDS = {
    "sft": ("chatrlhf.stages.sft_config:SFTConfig", "chatrlhf.stages.sft:train_sft"),
    "rm": ("chatrlhf.stages.reward_config:RMConfig", "chatrlhf.stages.reward:train_reward_model"),
    "ppo": ("chatrlhf.stages.ppo_config:PPOConfig", "chatrlhf.stages.ppo:train_ppo"),
    "grpo": ("chatrlhf.stages.ppo_config:GRPOConfig", "chatrlhf.stages.ppo:train_ppo"),
    "dpo": ("chatrlhf.stages.dpo_config:DPOConfig", "chatrlhf.stages.dpo:train_dpo"),
    "kto": ("chatrlhf.stages.kto_config:KTOConfig", "chatrlhf.stages.kto:train_kto"),
    "ilql": ("chatrlhf.stages.ilql_config:ILQLConfig", "chatrlhf.stages.ilql:train_ilql"),
    "pairs": ("chatrlhf.data.feedback:PairsConfig", "chatrlhf.data.feedback:make_pairs"),
    "export": ("chatrlhf.feedback.export:ExportConfig", "chatrlhf.feedback.export:run_export"),
    "train": ("chatrlhf.pipeline_config:PipelineConfig", "chatrlhf.pipeline:run_pipeline"),
    "eval": ("chatrlhf.evaluation.run:EvalConfig", "chatrlhf.evaluation.run:run_eval"),
    "chat": ("chatrlhf.chat:ChatConfig", "chatrlhf.chat:run_chat"),
    "serve": ("chatrlhf.feedback.serve:ServeConfig", "chatrlhf.feedback.serve:run_serve"),
    "serve-reward": ("chatrlhf.rewards.server:ServeRewardConfig", "chatrlhf.rewards.server:run_serve_reward"),
}
"""command -> (its config dataclass, the function that runs it), imported only when used."""

_GENERATION = {f: f"generation.{f}" for f in ("max_new_tokens", "temperature", "top_p", "backend")}
RENAMED = {
    "train": {
        "output_dir": "run.output_dir", "overwrite": "run.overwrite", "resume": "run.resume",
        "save_every": "run.save_every", "progress": "run.progress",
        "sft_engine": "sft.engine", "sft_epochs": "sft.epochs", "sft_max_steps": "sft.max_steps",
        "rm_engine": "rm.engine", "rm_epochs": "rm.epochs", "rm_max_steps": "rm.max_steps", "rm_from_sft": "rm.from_sft",
        "evaluate": "eval.enabled", "eval_prompts": "eval.prompts", "eval_limit": "eval.limit",
        "eval_generation": "eval.generation", "eval_batch_size": "eval.batch_size",
        "feedback": "feedback.db", "feedback_min_margin": "feedback.min_margin",
        "feedback_min_agreement": "feedback.min_agreement",
    },
    "chat": {"model": "model.name_or_path", **_GENERATION},
    "serve": {"model": "model.name_or_path (a second model: --compare_with)", **_GENERATION},
    "eval": {"models": "model.name_or_path with --name, and --baselines for the models it is compared with",
             "dtype": "model.dtype"},
}
"""Old spellings of each command's options -> the option of the one grammar (``--run.*``, ``--model.*``,
``--generation.*``, a section per pipeline stage); using one is an error that names the new option."""


def _import(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _config_class(name: str):
    return _import(COMMANDS[name][0])


def build_parser() -> ArgumentParser:
    # exit_on_error=False: parse errors come back as ArgumentError and main() prints them as one line (the
    # default prints the whole usage first). allow_abbrev=False: a misspelt flag such as
    # --engine.learning_rat is an error, not silently taken as the flag it abbreviates.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each field's docstring is its --help text
    parser = ArgumentParser(prog="chatrlhf", description="Align chat LLMs with human feedback.",
                            exit_on_error=False, allow_abbrev=False)
    subcommands = parser.add_subcommands(dest="command")
    for name in COMMANDS:
        cls = _config_class(name)
        sub = ArgumentParser(description=cls.__doc__, exit_on_error=False, allow_abbrev=False)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
        if name == "train":
            sub.add_argument("--preset", type=str, help=f"Shipped config preset: {', '.join(sorted(_presets()))}.")
        sub.add_class_arguments(cls, as_group=False)
        subcommands.add_subcommand(name, sub, help=(cls.__doc__ or "").strip().splitlines()[0])
    # Listed for --help only: main() hands `chatrlhf launch ...` to chatrlhf.launch before parsing.
    from chatrlhf import launch

    subcommands.add_subcommand("launch", launch.build_parser(), help=launch.LaunchConfig.__doc__.split(":")[0] + ".")
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N`` unless given ``--no_local_rank``; the rank is
    in the LOCAL_RANK environment variable as well, so the flag is dropped here."""
    return [a for a in argv if not a.startswith("--local_rank=")]


# ----------------------------------------------------------------------------- parse errors as one line
def _command_of(argv: list[str]) -> str | None:
    """The subcommand: the first argument that is not a flag (the top-level parser has no options)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


REPEATABLE = {"serve": ("--prompts",)}
"""List flags that may be given once per value (``--prompts A --prompts B``) as well as as a list (``'[A, B]'``)."""


def _collect_repeated(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--prompts A --prompts B`` -> ``--prompts ["A", "B"]`` (at the first one's place); a value written as a
    list (``[A, B]``) is left as it is."""
    import json

    values: dict[str, list[str]] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag in flags and (inline or i + 1 < len(argv)):
            value = inline if "=" in argv[i] else argv[i + 1]
            i += 1 if "=" in argv[i] else 2
            if value.lstrip().startswith("["):
                out += [flag, value]
                continue
            if flag not in values:
                out += [flag, None]  # filled below with every value of the flag
            values.setdefault(flag, []).append(value)
            continue
        out.append(argv[i])
        i += 1
    return [json.dumps(values[out[k - 1]]) if a is None else a for k, a in enumerate(out)]


def _renamed(key: str, command: str) -> str | None:
    """The new spelling of option ``key`` (dotted, without ``--``) if it is an old one of ``command``."""
    renamed = RENAMED.get(command, {})
    if key not in renamed and key in cli_errors.flag_names(_config_class(command)):
        return None  # an option of the new grammar that starts like an old one (--feedback.db)
    for old, new in renamed.items():
        if key == old or (key.startswith(old + ".") and " " not in new):
            return new + key[len(old):]
    return None


def _check_renamed(argv: list[str], command: str | None) -> None:
    """Old spellings (flags, or top-level keys of --config files) stop with the option to use instead."""
    if command is None:
        return
    for arg in argv:
        if arg.startswith("--") and (new := _renamed(arg[2:].split("=", 1)[0], command)):
            raise ConfigError(f"{arg.split('=', 1)[0]} is an old spelling: use --{new} (every command takes the same "
                              f"nested sections; `chatrlhf {command} --help` lists them)")
    for value in cli_errors.config_files(argv):
        for key in cli_errors.yaml_top_keys(value):
            if new := _renamed(key, command):
                raise ConfigError(f"'{key}' in --config {value} is an old spelling: write it as '{new}' (a nested "
                                  f"mapping, e.g. 'run:' then '  output_dir: ...')")


_NEGATIVE = re.compile(r"^-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--engine.learning_rate -1e-3`` -> ``--engine.learning_rate=-1e-3``: argparse takes a value that starts
    with ``-`` for a flag unless it looks like a plain ``-12`` / ``-.5``, so ``-1e-3`` would be "expected one
    argument" (validation then names the value as out of range, or it is a legitimate negative number)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse(argv: list[str]):
    """Returns (command name, the stage's config dataclass). Raises ConfigError with a one-line message."""
    argv = _join_negative_values(_expand_preset(_strip_local_rank(argv)))
    argv = _collect_repeated(argv, REPEATABLE.get(_command_of(argv), ()))
    command = _command_of(argv)
    for value in cli_errors.config_files(argv):
        data = cli_errors.check_config_file(value)
        if command is not None:
            cli_errors.check_sections(data, _config_class(command), value)
    cli_errors.check_flag_values(argv)
    _check_renamed(argv, _command_of(argv))
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as err:
        command = _command_of(argv)
        known = cli_errors.flag_names(_config_class(command)) if command else []
        raise ConfigError(cli_errors.parse_error_message(err, argv, command, known)) from None
    command = ns.command
    cls = _config_class(command)
    try:
        init = parser.instantiate(ns)[command]
        cfg = cls(**{f.name: init[f.name] for f in dataclasses.fields(cls)})
    except (TypeError, ValueError) as err:  # a value jsonargparse let through but cannot build the config from
        raise ConfigError(f"the options do not form a valid `chatrlhf {command}` config ({_one_line(err)[:300]}). "
                          f"Fix: check the values given (`chatrlhf {command} --help` lists the options).") from None
    return command, cfg


def _under_launcher() -> bool:
    # Several processes: each must leave the process group together, or one can abort at exit. A single
    # in-process run (tests, notebooks) keeps its group for the next call.
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _one_line(err: BaseException) -> str:
    # Some library messages span lines; the error stays one line so it reads as one in logs and scripts,
    # and a short one: a message quoting a huge value is cut in the middle.
    line = " ".join(str(err).split())
    return line if len(line) <= 2000 else f"{line[:1000]} [...] {line[-900:]}"


def check_command(argv: list[str]) -> None:
    """Parses and validates a chatrlhf command line (what ``chatrlhf launch`` checks before it starts processes)."""
    _, cfg = parse(argv)
    check_numbers(cfg)
    cfg.validate()


def _launch(argv: list[str]) -> int:
    """``chatrlhf launch [options] -- <command> ...``: the part after ``--`` goes to the launched processes
    unparsed, so launch has its own small parser (chatrlhf.launch)."""
    from chatrlhf.launch import run as run_launch

    try:
        run_launch(argv, check_command)
    except (ConfigError, OSError) as err:
        print(f"chatrlhf launch: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0


def _run(command: str, cfg, prefix: str) -> int:
    """Runs the command's function; several launched processes leave the process group together."""
    from chatrlhf import run_lock
    from chatrlhf.checkpoint import CheckpointError  # imports torch: only once the config is known to be good

    try:
        _import(COMMANDS[command][1])(cfg)
    except CheckpointError as err:
        # The checkpoint module names the file and the problem (and a setting to change where one would
        # fix it); what to do with a damaged checkpoint is the same for every file, so it is said here.
        # "Move", not "delete": the checkpoint may be fine for the run it came from.
        print(f"{prefix}: error: checkpoint: {_one_line(err)}. If the checkpoint is damaged: move its step dir out of "
              "the checkpoints dir to resume from the previous complete one, or start over with --run.overwrite "
              "true instead of --run.resume.", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as err:
        # A full disk fails a write deep in a library (safetensors raises its own error type, with no
        # path): it is said as one line naming the file, instead of a traceback or "[Errno 28]" alone.
        message = cli_errors.disk_full_message(err, cfg)
        if message is None:
            raise
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    finally:
        run_lock.release_all()  # the output dirs this command locked (the kernel would at exit; tests run on)
    if _under_launcher():
        from chatrlhf.engine import shutdown_distributed

        shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    prefix = f"chatrlhf {_command_of(argv) or ''}".rstrip()
    try:
        command, cfg = parse(argv)
        prefix = f"chatrlhf {command}"
        # Config mistakes fail here, in a second, before the stage imports torch, DeepSpeed and the model.
        check_numbers(cfg, name_of=lambda key: cli_errors.source_of(key, argv))
        cfg.validate()
        return _run(command, cfg, prefix)
    except (ConfigError, ValueError, OSError, ImportError) as err:
        # User-actionable errors (bad flags, YAML, data, paths, model dirs) print one clear line, not a
        # traceback. OSError covers FileNotFoundError and the I/O errors that name their path.
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except FloatingPointError as err:
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_NONFINITE


if __name__ == "__main__":
    raise SystemExit(main())
