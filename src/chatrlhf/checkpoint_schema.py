"""Typed schemas of the checkpoint state files a resume reads, as tables of field -> check.

``trainer_state.json``, each engine's ``engine.json`` and ``scheduler.json``, the RNG state of every rank,
``latest`` and ``manifest.json`` are each checked against their table before a resume loads or writes
anything; a violation is one :class:`~chatrlhf.checkpoint.CheckpointError` naming the file, the field and
what is wrong: ``.../step-1/trainer_state.json: field 'step' must be an integer >= 0, got "abc"``.

Everything here is torch-free and imports nothing of chatrlhf (it is the bottom layer of the checkpoint
modules). A check is a function ``(value, field) -> None`` that raises :class:`Invalid`; a :class:`Schema` is a table
of them plus the relations between fields. Tensors are checked as :class:`TensorMeta` (dtype and shape, read
from a safetensors header without loading the data).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1
MT_WORDS = 624  # Mersenne Twister state words (Python's random and NumPy's MT19937)
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe or does not match this run (import it from checkpoint)."""


class Invalid(ValueError):
    """A value breaks its check: where it sits (``base_lrs[1]``), what it must be, and what it is."""

    def __init__(self, field: str, requirement: str, value: Any, text: str = ""):
        super().__init__(field, requirement, value)
        self.field, self.requirement, self.value = field, requirement, value
        self.text = text
        """The whole complaint when it is not "must be <requirement>" (e.g. "is missing")."""

    def within(self, prefix: str) -> Invalid:
        """The same complaint about the field as part of ``prefix`` (``extra.kl_ctl`` + ``value``)."""
        return Invalid(f"{prefix}.{self.field}" if self.field else prefix, self.requirement, self.value, self.text)

    def __str__(self) -> str:
        at = f"field '{self.field}'" if self.field else "the value"
        value = self.value if isinstance(self.value, _Shown) else show(self.value)
        return f"{at} {self.text}" if self.text else f"{at} must be {self.requirement}, got {value}"


class TensorMeta(NamedTuple):
    """A tensor as its file header describes it: safetensors dtype (``F32``, ``U8``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


Check = Callable[[Any, str], None]


def show(value: Any) -> str:
    """A value as it appears in the file, cut to one short piece of a line."""
    if isinstance(value, TensorMeta):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- checks ---------------------------------------------------------------------------------------------


def integer(low: int = 0, high: int = INT64_MAX) -> Check:
    """An int in ``low..high`` (the default ceiling: what an int64 counter of torch/DeepSpeed holds)."""
    text = f"an integer >= {low}" if high == INT64_MAX else f"an integer in {low}..{high}"
    too_big = f"{text} and below 2**63" if high == INT64_MAX else text

    def check(value: Any, where: str) -> None:
        if not _is_int(value) or not low <= value <= high:
            raise Invalid(where, too_big if _is_int(value) and value > high else text, value)

    return check


def number(low: float | None = None) -> Check:
    """A finite int or float (``>= low`` when given): JSON's 1e999 parses as inf."""
    text = "a finite number" if low is None else f"a finite number >= {low:g}"

    def check(value: Any, where: str) -> None:
        finite = _is_number(value) and (_is_int(value) or math.isfinite(value))  # an int is finite (and may
        if not finite or (low is not None and value < low):  # be too big for math.isfinite)
            raise Invalid(where, text, value)

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise Invalid(where, "true or false", value)


def one_of(*options: Any) -> Check:
    text = "one of " + ", ".join(json.dumps(o) for o in options)

    def check(value: Any, where: str) -> None:
        if not any(type(value) is type(o) and value == o for o in options):  # true is not 1
            raise Invalid(where, text, value)

    return check


def none_or(inner: Check, text: str) -> Check:
    def check(value: Any, where: str) -> None:
        if value is not None:
            try:
                inner(value, where)
            except Invalid as bad:
                raise Invalid(bad.field, f"null or {text}", bad.value) from None

    return check


def list_of(item: Check, length: int | None = None, what: str = "a list") -> Check:
    """A JSON list (or a decoded tuple) of ``length`` items, each passing ``item`` (named ``field[i]``)."""
    text = what if length is None else f"{what} of {length} items"

    def check(value: Any, where: str) -> None:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise Invalid(where, text, value if not isinstance(value, (list, tuple)) else _count(value))
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")

    return check


def _count(items: list | tuple) -> Any:
    return items if len(items) <= 4 else _Shown(f"{len(items)} items")


class _Shown(str):
    """A description shown as is (not as a JSON string) in the error message."""


def sequence(*items: Check) -> Check:
    """A fixed-length list or tuple whose i-th item passes ``items[i]``."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise Invalid(where, f"a list of {len(items)} items", value)
        for i, (v, item) in enumerate(zip(value, items)):
            item(v, f"{where}[{i}]")

    return check


def json_object(value: Any, where: str) -> None:
    """A JSON object whose every number, however deep, is finite (a NaN here would reach a loss)."""
    if not isinstance(value, dict):
        raise Invalid(where, "a JSON object", value)
    finite_numbers(value, where)


def finite_numbers(value: Any, where: str) -> None:
    """Every float in a tree of JSON values (and decoded tuples) is finite; keys are text."""
    stack = [(value, where)]
    while stack:  # iterative: depth is bounded by the parser, not by Python's stack
        node, at = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise Invalid(at, "a finite number", node)
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise Invalid(at, "a JSON object (text keys)", _Shown(show(list(node)[:4])))
            stack.extend((v, f"{at}.{k}") for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(node))
        elif not (node is None or isinstance(node, (str, int, float))):
            raise Invalid(at, "a JSON value", _Shown(type(node).__name__))


def empty_object(value: Any, where: str) -> None:
    if value != {} or not isinstance(value, dict):
        raise Invalid(where, "{} (a schedule function keeps no state)", value)


def tensor(dtype: str, shape: tuple[int, ...] | None = None, ndim: int | None = None) -> Check:
    text = f"a {dtype} tensor" + (f" of shape {list(shape)}" if shape else f" of {ndim} dimension(s)" if ndim else "")

    def check(value: Any, where: str) -> None:
        ok = isinstance(value, TensorMeta) and value.dtype == dtype
        if not ok or (shape is not None and tuple(value.shape) != shape) or (ndim and len(value.shape) != ndim):
            raise Invalid(where, text, value if isinstance(value, TensorMeta) else _Shown(show(value)))

    return check


def relative_file(value: Any, where: str) -> None:
    """A manifest entry: a path inside the checkpoint dir (never absolute, never through ``..``)."""
    parts = Path(value).parts if isinstance(value, str) else ()
    if not parts or Path(value).is_absolute() or ".." in parts or "\\" in value or value == "manifest.json":
        raise Invalid(where, "a file name inside the checkpoint dir", value)


def mapping(key: Check, val: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, "a JSON object", value)
        for k, v in value.items():
            key(k, where)
            val(v, f"{where}.{k}")

    return check


# ---- schemas --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """A rule between fields: ``field`` must be ``requirement`` (a template over the fields) unless ``holds``
    returns True for the data (defaults filled in)."""

    field: str
    requirement: str
    holds: Callable[[dict], bool]


@dataclass(frozen=True)
class Schema:
    fields: Mapping[str, Check]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Optional fields and the value they take when absent (older writers did not record them)."""
    relations: tuple[Relation, ...] = ()


def apply(schema: Schema, data: Any, where: str = "") -> dict:
    """``data`` against ``schema`` (fields named ``where.name``); returns it with the defaults filled in."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise Invalid(where, "a JSON object", data)
    unknown = sorted(set(data) - set(schema.fields))
    if unknown:
        raise Invalid(f"{prefix}{unknown[0]}", "", data[unknown[0]], text="is not a known field")
    for name, check in schema.fields.items():
        if name in data:
            check(data[name], f"{prefix}{name}")
        elif name not in schema.defaults:
            raise Invalid(f"{prefix}{name}", "", None, text="is missing")
    full = {**schema.defaults, **data}
    for rel in schema.relations:
        if not rel.holds(full):
            raise Invalid(f"{prefix}{rel.field}", rel.requirement.format_map(full), full[rel.field])
    return full


def nested(schema: Schema) -> Check:
    def check(value: Any, where: str) -> None:
        apply(schema, value, where)

    return check


def check_fields(path: Path | str, data: Any, schema: Schema) -> dict:
    """``data`` (a parsed JSON file) against ``schema``: returns it with the defaults filled in, or raises one
    :class:`CheckpointError` naming ``path`` and the first field that is wrong."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {show(data)}")
    unknown = sorted(set(data) - set(schema.fields))
    if unknown:  # (worded for the reader of a hand-edited or foreign file)
        raise CheckpointError(f"{path}: unknown fields {unknown}; it was not written by this version of chatrlhf")
    try:
        return apply(schema, data)
    except Invalid as bad:
        raise fail(path, bad) from None


def fail(path: Path | str, bad: Invalid) -> CheckpointError:
    """The one-line error for ``bad`` in the file ``path``."""
    return CheckpointError(f"{path}: {bad}")


def _epoch_fits(s: dict) -> bool:
    # step = epoch x steps_per_epoch + step_in_epoch with step_in_epoch < steps_per_epoch
    if s["epoch"] == 0:
        return True
    per_epoch, rest = divmod(s["step"] - s["step_in_epoch"], s["epoch"])
    return rest == 0 and per_epoch > s["step_in_epoch"]


COUNT = integer(0)

TRAINER_STATE = Schema(
    fields={"step": COUNT, "epoch": COUNT, "step_in_epoch": COUNT, "samples_seen": COUNT,
            "world_size": COUNT, "global_batch": COUNT, "extra": json_object},
    defaults={"world_size": 0, "global_batch": 0},
    relations=(
        Relation("epoch", "<= step ({step})", lambda s: s["epoch"] <= s["step"]),
        Relation("step_in_epoch", "<= step ({step})", lambda s: s["step_in_epoch"] <= s["step"]),
        Relation("step_in_epoch", "below the steps per epoch that step {step} and epoch {epoch} give", _epoch_fits),
        Relation("samples_seen", "<= step x global_batch ({step} x {global_batch})",
                 lambda s: not s["global_batch"] or s["samples_seen"] <= s["step"] * s["global_batch"]),
        Relation("global_batch", "a multiple of world_size ({world_size})",
                 lambda s: not s["world_size"] or s["global_batch"] % s["world_size"] == 0),
    ),
)

ENGINE = Schema(
    fields={"global_steps": COUNT, "global_samples": COUNT, "micro_steps": COUNT, "skipped_steps": COUNT,
            "optimizer_steps": COUNT, "nonfinite_skips": COUNT, "consecutive_skips": COUNT,
            "zero_stage": integer(0, 3), "world_size": integer(1),
            "dtype": one_of("float32", "bfloat16", "float16")},
    defaults={"nonfinite_skips": 0, "consecutive_skips": 0},
    relations=(  # DeepSpeed counts every accumulation boundary in global_steps, applied or skipped
        Relation("optimizer_steps", "<= global_steps ({global_steps})",
                 lambda e: e["optimizer_steps"] <= e["global_steps"]),
        Relation("skipped_steps", "<= global_steps ({global_steps})", lambda e: e["skipped_steps"] <= e["global_steps"]),
        Relation("global_steps", "<= micro_steps ({micro_steps})", lambda e: e["global_steps"] <= e["micro_steps"]),
        Relation("consecutive_skips", "<= nonfinite_skips ({nonfinite_skips})",
                 lambda e: e["consecutive_skips"] <= e["nonfinite_skips"]),
    ),
)

def _as_long_as_lrs(items: list | None, s: dict) -> bool:
    return items is None or len(items) == len(s["base_lrs"])


_LRS = list_of(number(0.0), what="a list of learning rates")
SCHEDULER = Schema(  # torch's LambdaLR.state_dict(); load_state_dict sets every key as an attribute: no others
    fields={"base_lrs": _LRS, "last_epoch": COUNT, "_step_count": COUNT, "_is_initial": boolean,
            "_get_lr_called_within_step": boolean, "_last_lr": _LRS, "verbose": boolean,
            "lr_lambdas": list_of(none_or(empty_object, "{}"))},
    defaults={"_step_count": None, "_is_initial": False, "_get_lr_called_within_step": False, "_last_lr": None,
              "verbose": False, "lr_lambdas": None},
    relations=(
        Relation("base_lrs", "a non-empty list", lambda s: len(s["base_lrs"]) > 0),
        Relation("_last_lr", "as long as base_lrs", lambda s: _as_long_as_lrs(s["_last_lr"], s)),
        Relation("lr_lambdas", "as long as base_lrs", lambda s: _as_long_as_lrs(s["lr_lambdas"], s)),
        Relation("_step_count", "last_epoch + 1 ({last_epoch} + 1)",
                 lambda s: s["_step_count"] is None or s["_step_count"] == s["last_epoch"] + 1),
    ),
)


def step_dir_name(value: Any, where: str) -> None:
    if not isinstance(value, str) or not STEP_DIR.match(value):
        raise Invalid(where, "the name of a step dir beside it (step-N)", value)


POINTER = Schema(
    fields={"step": COUNT, "dir": step_dir_name},
    relations=(Relation("dir", '"step-{step}" (its step)', lambda p: p["dir"] == f"step-{p['step']}"),),
)

MANIFEST = Schema(fields={"step": COUNT, "files": mapping(relative_file, COUNT)})


# ---- RNG state (a decoded tensor tree: tuples stay tuples, tensors are TensorMeta) --------------------------


def _mt_state(value: Any, where: str) -> None:
    """Python's ``random`` state: 624 uint32 words and the position (0..624) of the next one."""
    list_of(integer(0, UINT32_MAX), MT_WORDS + 1, what="a list of 32-bit words")(value, where)
    integer(0, MT_WORDS)(value[-1], f"{where}[{MT_WORDS}]")


NUMPY_RNG = Schema(
    fields={"bit_generator": one_of("MT19937"), "has_gauss": one_of(0, 1), "gauss": number(),
            "state": nested(Schema({"key": list_of(integer(0, UINT32_MAX), MT_WORDS, what="a list of 32-bit words"),
                                    "pos": integer(0, MT_WORDS)}))},
)


def rng_schema(torch_state_bytes: int) -> Schema:
    """``capture_rng_state()``'s tree; ``torch_state_bytes``: the size of this torch's CPU generator state."""
    return Schema(
        fields={"python": sequence(one_of(3), _mt_state, none_or(number(), "a finite number")),
                "numpy": nested(NUMPY_RNG), "torch": tensor("U8", (torch_state_bytes,)),
                "cuda": list_of(tensor("U8", ndim=1), what="a list of CUDA generator states")},
        defaults={"cuda": []},
    )
