"""Fuzzing the readers of checkpoint state: whatever a state file holds, reading it gives the state or one
``CheckpointError`` (for the KL controller and normalisers: ``checkpoint_schema.Invalid``, a ValueError that
the resume turns into one), never another exception.

The readers: ``trainer_state.json`` (``load_trainer_state``), the schemas of ``engine.json``, ``scheduler.json``,
``latest`` and ``manifest.json`` (``check_fields``), the pointer and manifest as a resume reads them from disk
(``resume_checkpoint``), the RNG state (``check_rng_state``), tensor-tree skeletons (``tree_header``) and the
RL extras (``load_state_dict``). Values are hypothesis ``recursive`` JSON-ish trees (huge integers, NaN/inf,
bools, nesting) under the files' real field names, a real state with one field replaced, and random bytes.

Budget: 9 properties x ``EXAMPLES`` = 250 examples = 2,250 examples, ``derandomize=True`` (the same examples
every run, no example database), about 7 s on one core.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf import checkpoint as ckpt
from chatrlhf import checkpoint_schema as schema
from chatrlhf import tensor_files
from chatrlhf.algorithms.rl import AdaptiveKLController, RunningMoments

EXAMPLES = 250
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10)
SCHEMAS = {"trainer_state": schema.TRAINER_STATE, "engine": schema.ENGINE, "scheduler": schema.SCHEDULER,
           "latest": schema.POINTER, "manifest": schema.MANIFEST}
REAL = {  # what chatrlhf writes, for "one field replaced" examples
    "trainer_state": {"step": 3, "epoch": 1, "step_in_epoch": 0, "samples_seen": 24, "world_size": 1,
                      "global_batch": 8, "extra": {"kl_ctl": {"value": 0.1}}},
    "engine": {"global_steps": 3, "global_samples": 24, "micro_steps": 6, "skipped_steps": 0, "optimizer_steps": 3,
               "nonfinite_skips": 0, "consecutive_skips": 0, "zero_stage": 0, "world_size": 1, "dtype": "float32"},
    "scheduler": {"base_lrs": [2e-5, 2e-5], "last_epoch": 3, "_step_count": 4, "_is_initial": False,
                  "_get_lr_called_within_step": False, "_last_lr": [1e-5, 1e-5], "lr_lambdas": [{}, {}]},
    "latest": {"step": 1, "dir": "step-1"},
    "manifest": {"step": 1, "files": {"engine.json": 222, "actor/model.safetensors": 10}},
}


def accepted_or_refused(fn, *args, refusal=ckpt.CheckpointError):
    """``fn(*args)``'s result, or None when it raised ``refusal``; any other exception fails the example."""
    try:
        return fn(*args)
    except refusal:
        return None


@st.composite
def state_files(draw):
    """(file kind, a dict under its real field names: real values with some replaced, some left out)."""
    kind = draw(st.sampled_from(sorted(SCHEMAS)))
    data = dict(REAL[kind])
    for name in draw(st.lists(st.sampled_from(sorted(SCHEMAS[kind].fields)), max_size=3)):
        value = draw(JSONISH | st.just(schema.Invalid) | st.binary(max_size=3))  # non-JSON values too
        if value is schema.Invalid:
            data.pop(name, None)
        else:
            data[name] = value
    if draw(st.booleans()):
        data.update(draw(st.dictionaries(st.text(max_size=4), JSONISH, max_size=2)))  # unknown fields
    return kind, data


@FUZZ
@given(state_files())
def test_state_file_schemas_accept_or_raise_a_checkpoint_error(kind_data):
    kind, data = kind_data
    full = accepted_or_refused(schema.check_fields, f"{kind}.json", data, SCHEMAS[kind])
    if full is not None:  # accepted: every declared field is present and JSON-typed
        assert set(SCHEMAS[kind].fields) <= set(full)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in full.values())


@FUZZ
@given(JSONISH, st.sampled_from(sorted(SCHEMAS)))
def test_any_json_value_as_a_state_file_is_accepted_or_refused(value, kind):
    accepted_or_refused(schema.check_fields, f"{kind}.json", value, SCHEMAS[kind])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_ckpt")


@FUZZ
@given(st.binary(max_size=64) | JSONISH.map(lambda v: json.dumps(v).encode()) | state_files().map(
    lambda kd: json.dumps(kd[1], default=str).encode()))
def test_trainer_state_file_of_any_bytes(scratch, content):
    (scratch / "trainer_state.json").write_bytes(content)
    state = accepted_or_refused(ckpt.load_trainer_state, scratch)
    if state is not None:
        assert isinstance(state.step, int) and state.step >= 0 and isinstance(state.extra, dict)


def _one_checkpoint(root: Path) -> Path:
    step = root / "step-1"
    step.mkdir(parents=True, exist_ok=True)
    (step / "a.json").write_text("{}")
    (step / "manifest.json").write_text(json.dumps({"step": 1, "files": {"a.json": 2}}))
    return step


@FUZZ
@given(st.binary(max_size=48) | st.sampled_from([b'{"step": 1, "dir": "step-1"}', b'{"step": 0, "dir": "step-0"}'])
       | JSONISH.map(lambda v: json.dumps({"step": 1, "dir": v}).encode()))
def test_latest_pointer_of_any_bytes(scratch, content):
    step = _one_checkpoint(scratch / "ckpts")
    (scratch / "ckpts" / "latest").write_bytes(content)
    found = accepted_or_refused(ckpt.resume_checkpoint, scratch / "ckpts")
    assert found in (None, step)


@FUZZ
@given(st.binary(max_size=48) | JSONISH.map(lambda v: json.dumps({"step": 1, "files": v}).encode())
       | st.dictionaries(st.text(max_size=8), JSONISH, max_size=3).map(lambda d: json.dumps(d).encode()))
def test_manifest_of_any_bytes(scratch, content):
    step = _one_checkpoint(scratch / "ckpts")
    (scratch / "ckpts" / "latest").write_text('{"step": 1, "dir": "step-1"}')
    (step / "manifest.json").write_bytes(content)
    found = accepted_or_refused(ckpt.resume_checkpoint, scratch / "ckpts")
    assert found in (None, step)
    assert ckpt.is_complete(step) == (found == step)


RNG_FIELDS = [("python",), ("python", 0), ("python", 1), ("python", 2), ("numpy",), ("numpy", "bit_generator"),
              ("numpy", "state"), ("numpy", "state", "key"), ("numpy", "state", "pos"), ("numpy", "has_gauss"),
              ("numpy", "gauss"), ("torch",), ("cuda",)]
TENSORS = st.sampled_from([torch.zeros(3, dtype=torch.uint8), torch.zeros(5056, dtype=torch.uint8),
                           torch.ones(5056, dtype=torch.float32), torch.zeros(16, dtype=torch.uint8)])


def _replace(tree, path: tuple, value):
    if not path:
        return value
    if isinstance(tree, tuple):
        items = list(tree)
        items[path[0]] = _replace(items[path[0]], path[1:], value)
        return tuple(items)
    return {**tree, path[0]: _replace(tree.get(path[0]), path[1:], value)}  # "cuda" is absent on CPU


@FUZZ
@given(st.sampled_from(RNG_FIELDS), JSONISH | TENSORS | st.lists(TENSORS, max_size=2))
def test_rng_state_with_any_field_replaced(path, value):
    state = _replace(tensor_files.capture_rng_state(), path, value)
    accepted_or_refused(tensor_files.check_rng_state, state, "rng.rank0.json")


@FUZZ
@given(JSONISH | TENSORS)
def test_any_tree_as_rng_state(value):
    accepted_or_refused(tensor_files.check_rng_state, value, "rng.rank0.json")


@FUZZ
@given(st.recursive(SCALARS | st.sampled_from([{"__tensor__": "0"}, {"__tensor__": "9"}, {"__tensor__": 0}]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["__tensor__", "__float__", "__tuple__", "__dict__", "state", "x"]), inner,
                        max_size=2), max_leaves=8))
def test_tensor_tree_skeleton_of_any_shape(scratch, skeleton):
    tensor_files.save_tensor_tree({"w": torch.zeros(2)}, scratch, "tree")  # the header: one tensor named "0"
    (scratch / "tree.json").write_text(json.dumps(skeleton))
    accepted_or_refused(tensor_files.tree_header, scratch, "tree")


@FUZZ
@given(st.dictionaries(st.sampled_from(["value", "count", "mean", "m2", "other"]), JSONISH, max_size=4) | JSONISH)
def test_rl_extras_load_or_raise_invalid(state):
    for obj in (AdaptiveKLController(0.1, 6.0, 100.0), RunningMoments()):
        before = obj.state_dict()
        try:
            obj.load_state_dict(state)
        except schema.Invalid:
            assert obj.state_dict() == before  # refused: nothing set
        else:
            assert all(math.isfinite(v) for v in obj.state_dict().values())
