"""Fuzzing the config loader: whatever a ``--config`` file or a flag holds, reading and checking it ends in
success or one ConfigError/ValueError line, never another exception (a traceback for the user).

Budget (fixed, derandomized): 200 random byte files, 200 random YAML documents over the real option names,
200 random flag values and 200 random YAML texts through ``chatrlhf.limits.load_yaml``: 800 examples.
"""

from __future__ import annotations

import functools
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf import cli, cli_errors
from chatrlhf.config import ConfigError, check_numbers
from chatrlhf.limits import InputError, load_yaml
from chatrlhf.stages.sft_config import SFTConfig

NAMES = cli_errors.flag_names(SFTConfig)


@pytest.fixture(autouse=True, scope="module")
def one_parser():
    """Building the parser costs ~0.5 s and is the same every time: built once here, so the budget goes to
    examples. (``parse_args`` keeps no state between calls.)"""
    build = cli.build_parser
    cli.build_parser = functools.lru_cache(maxsize=1)(build)
    yield
    cli.build_parser = build
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _nest(pairs: dict[str, object]) -> dict:
    """{"engine.seed": 1} -> {"engine": {"seed": 1}} (a later key under a scalar is dropped)."""
    out: dict = {}
    for key, value in pairs.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(leaf, value)
    return out


def _check(argv: list[str]) -> None:
    """What ``chatrlhf.cli.main`` does before a stage runs; only the project's own errors may escape."""
    try:
        _, cfg = cli.parse(argv)
        check_numbers(cfg)
        cfg.validate()
    except (ConfigError, ValueError) as err:
        assert str(err).strip() and "Traceback" not in str(err)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_config_file(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    _check(["sft", "--config", str(path)])


@SETTINGS
@given(pairs=st.dictionaries(st.sampled_from(NAMES), values, max_size=6))
def test_any_values_under_the_real_option_names(tmp_path, pairs):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_nest(pairs), allow_unicode=False))
    _check(["sft", "--config", str(path)])


@SETTINGS
@given(name=st.sampled_from(NAMES), value=st.one_of(st.text(max_size=30), scalars.map(str)))
def test_any_flag_value(name, value):
    _check(["sft", f"--{name}", value])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.sampled_from(list("[]{}&*ab:,- \n!1.e\"'")), max_size=120))
def test_load_yaml_raises_only_its_own_errors(text):
    try:
        value = load_yaml(text, "x.yaml")
    except (yaml.YAMLError, InputError):
        return
    assert not (isinstance(value, float) and math.isnan(value))  # refused, never returned
