"""Environments for RL on verifiable and multi-turn tasks (docs/environments.md).

``--env SPEC`` names one: a shipped name (``math``, ``calculator``, ``dialog``), ``FILE.py:Name`` or
``package.module:Name`` (a subclass of ``Environment``). ``base.py`` holds the protocol, ``episodes.py`` the
multi-turn rollout driver, ``tools.py`` the tool-call format.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

from chatrlhf.environments.base import Environment, Step

SHIPPED = {
    "math": "chatrlhf.environments.math_envs:MathEnv",
    "calculator": "chatrlhf.environments.math_envs:CalculatorEnv",
    "dialog": "chatrlhf.environments.dialog:DialogEnv",
}
"""Shipped environments: name -> class."""
FORMS = f"one of {', '.join(SHIPPED)}, FILE.py:Name or package.module:Name (an Environment subclass)"
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def load_environment(spec: str, flag: str = "env") -> Environment:
    """The environment ``spec`` names, instantiated; errors name ``--flag``, the spec and the forms."""
    where, _, name = SHIPPED.get(spec, spec).rpartition(":")
    if not (name.isidentifier() and (where.endswith(".py") or _MODULE.fullmatch(where))):
        raise ValueError(f"--{flag} {spec!r} is not an environment: use {FORMS}")
    module = _from_file(Path(where), spec, flag) if where.endswith(".py") else _from_module(where, spec, flag)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"--{flag} {spec!r}: {where} has no Environment subclass named {name!r} "
                         "(subclass chatrlhf.environments.Environment and override start and step)")
    env = cls()
    for attr in ("max_turns", "max_total_tokens"):
        value = getattr(env, attr)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{flag} {spec!r}: {name}.{attr} must be a positive integer, got {value!r}")
    return env


def _from_file(file: Path, spec: str, flag: str):
    if not file.is_file():
        raise FileNotFoundError(f"--{flag} {spec!r}: file {file} does not exist; use {FORMS}")
    module_spec = importlib.util.spec_from_file_location(f"chatrlhf_env_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ImportError(f"--{flag} {spec!r}: running {file} failed with {type(err).__name__}: {err}") from err
    return module


def _from_module(name: str, spec: str, flag: str):
    try:
        found = importlib.util.find_spec(name)
    except ImportError:
        found = None
    if found is None:
        raise ModuleNotFoundError(f"--{flag} {spec!r}: no module named {name!r} can be imported; install it, add "
                                  f"its folder to PYTHONPATH, or use {FORMS}")
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise ImportError(f"--{flag} {spec!r}: importing {name} failed with {type(err).__name__}: {err}") from err


__all__ = ["FORMS", "SHIPPED", "Environment", "Step", "load_environment"]
