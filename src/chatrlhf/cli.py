"""The ``chatrlhf`` command: one subcommand per stage, each a thin call into ``chatrlhf.stages``.

Every option of a stage's typed config is a flag (``--engine.learning_rate 1e-5``); ``--config FILE.yaml``
loads any of them from YAML first, and flags given after it override it. ``--preset NAME`` loads a
shipped YAML preset (see ``chatrlhf/presets/``) the same way.
"""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources

from jsonargparse import ActionConfigFile, ArgumentParser

from chatrlhf.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    PairsConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
)


def _presets() -> dict[str, str]:
    root = resources.files("chatrlhf") / "presets"
    return {p.name.removesuffix(".yaml"): str(p) for p in root.iterdir() if p.name.endswith(".yaml")}


def _expand_preset(argv: list[str]) -> list[str]:
    """``--preset NAME`` -> ``--config <shipped file>`` in place, so later flags still override it."""
    out = []
    it = iter(argv)
    for arg in it:
        name = None
        if arg == "--preset":
            name = next(it, None)
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        if arg == "--preset" or arg.startswith("--preset="):
            presets = _presets()
            if name not in presets:
                raise SystemExit(f"chatrlhf: unknown --preset {name!r}; available: {', '.join(sorted(presets))}")
            out += ["--config", presets[name]]
        else:
            out.append(arg)
    return out


def _eval_config():
    from chatrlhf.evaluation.run import EvalConfig

    return EvalConfig


def _chat_config():
    from chatrlhf.chat import ChatConfig

    return ChatConfig


COMMANDS = {
    "sft": (SFTConfig, "chatrlhf.stages.sft:train_sft"),
    "rm": (RMConfig, "chatrlhf.stages.reward:train_reward_model"),
    "ppo": (PPOConfig, "chatrlhf.stages.ppo:train_ppo"),
    "grpo": (GRPOConfig, "chatrlhf.stages.ppo:train_ppo"),
    "dpo": (DPOConfig, "chatrlhf.stages.dpo:train_dpo"),
    "pairs": (PairsConfig, "chatrlhf.data.feedback:make_pairs"),
    "train": (PipelineConfig, "chatrlhf.pipeline:run_pipeline"),
    "eval": (_eval_config, "chatrlhf.evaluation.run:run_eval"),
    "chat": (_chat_config, "chatrlhf.chat:run_chat"),
}


def _config_class(name: str):
    cls = COMMANDS[name][0]
    return cls if dataclasses.is_dataclass(cls) else cls()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="chatrlhf", description="Align chat LLMs with human feedback.")
    subcommands = parser.add_subcommands(dest="command")
    for name in COMMANDS:
        cls = _config_class(name)
        sub = ArgumentParser(description=cls.__doc__)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
        if name == "train":
            sub.add_argument("--preset", type=str, help=f"Shipped config preset: {', '.join(sorted(_presets()))}.")
        sub.add_class_arguments(cls, as_group=False)
        subcommands.add_subcommand(name, sub, help=(cls.__doc__ or "").strip().splitlines()[0])
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N`` unless given ``--no_local_rank``; the rank is
    in the LOCAL_RANK environment variable as well, so the flag is dropped here."""
    return [a for a in argv if not a.startswith("--local_rank=")]


def parse(argv: list[str]):
    """Returns (command name, the stage's config dataclass)."""
    parser = build_parser()
    ns = parser.parse_args(_expand_preset(_strip_local_rank(argv)))
    command = ns.command
    init = parser.instantiate(ns)[command]
    cls = _config_class(command)
    cfg = cls(**{f.name: init[f.name] for f in dataclasses.fields(cls)})
    return command, cfg


def main(argv: list[str] | None = None) -> int:
    command, cfg = parse(sys.argv[1:] if argv is None else argv)
    module, fn = COMMANDS[command][1].split(":")
    import importlib

    try:
        getattr(importlib.import_module(module), fn)(cfg)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        # User-actionable errors (bad flags, data, paths) print one clear line, not a traceback.
        print(f"chatrlhf {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
