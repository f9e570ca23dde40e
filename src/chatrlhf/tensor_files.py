"""Tensor files without pickle: model weights, tensor trees (an optimizer ``state_dict``) and RNG states.

Nothing here unpickles: tensors are read with safetensors (or ``torch.load(weights_only=True)`` for
foreign ``.pt``/``.bin`` files), everything else is JSON. A tensor tree (an optimizer ``state_dict``,
the RNG states) is stored as ``NAME.safetensors`` (the tensors) plus ``NAME.json`` (the skeleton).
Loading checks as it goes: a malformed skeleton or header, or a NaN/inf in a float tensor, is a
``CheckpointError`` naming the file and the field or tensor; ``tree_header`` and ``weights_header`` check the
files from their headers, without reading tensor data, so a resume can check a checkpoint before loading it.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrlhf.checkpoint import CheckpointError, read_json
from chatrlhf.checkpoint_schema import Invalid, TensorMeta, apply, fail, rng_schema, show
from chatrlhf.limits import parse_json

Leaf = Callable[[str, str], Any]  # (tensor name in the file, where in the tree) -> the tensor or its TensorMeta

log = logging.getLogger(__name__)


# ---- tensor trees: safetensors for tensors, JSON for the skeleton ------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    # Tags are single-key dicts starting with "__"; plain dicts using such keys go through "__dict__",
    # so decoding is unambiguous. Dict keys may be ints (optimizer state is keyed by param index).
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return _encode_scalar(obj)
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return _encode_dict(obj, tensors, path)
    raise TypeError(
        f"{path}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
        "(only tensors, None, bool, int, float, str, list, tuple and dict are; convert it to those first)"
    )


def _encode_scalar(obj: None | bool | str | int | float) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):  # also IntEnum (e.g. DeepSpeed's ZeroStageEnum): stored as its value
        return int(obj)
    # JSON has no NaN/inf: those go through a tag
    return {"__float__": repr(obj)} if obj != obj or obj in (float("inf"), float("-inf")) else obj


def _encode_dict(obj: dict, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if all(isinstance(k, str) and not k.startswith("__") for k in obj):
        return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    for k in obj:
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} cannot be stored; use str or int")
    return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}


def _tensor_tag(value: Any, leaf: Leaf, where: str) -> Any:
    if not isinstance(value, str):
        raise Invalid(where, "a tensor name (text)", value)
    return leaf(value, where)


def _float_tag(value: Any, leaf: Leaf, where: str) -> float:
    try:
        if isinstance(value, str):
            return float(value)
    except ValueError:
        pass
    raise Invalid(where, 'a float written as text ("nan", "inf")', value)


def _tuple_tag(value: Any, leaf: Leaf, where: str) -> tuple:
    if not isinstance(value, list):
        raise Invalid(where, "a list (of the tuple's items)", value)
    return tuple(_decode(v, leaf, f"{where}[{i}]") for i, v in enumerate(value))


def _dict_tag(value: Any, leaf: Leaf, where: str) -> dict:
    pairs = value if isinstance(value, list) else None
    if pairs is None or not all(isinstance(p, list) and len(p) == 2 and _is_key(p[0]) for p in pairs):
        raise Invalid(where, "a list of [key, value] pairs with text or integer keys", value)
    return {k: _decode(v, leaf, _sub(where, k)) for k, v in pairs}


def _is_key(key: Any) -> bool:
    return isinstance(key, (str, int)) and not isinstance(key, bool)


def _sub(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


_TAGS = {"__tensor__": _tensor_tag, "__float__": _float_tag, "__tuple__": _tuple_tag, "__dict__": _dict_tag}


def _decode(obj: Any, leaf: Leaf, where: str) -> Any:
    """Inverse of :func:`_encode`; ``leaf(name, where)`` gives the tensor a ``__tensor__`` tag names. A
    malformed skeleton raises :class:`Invalid` naming where (``state.3.exp_avg``)."""
    if isinstance(obj, list):
        return [_decode(v, leaf, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and (tag := next(iter(obj))) in _TAGS:
        return _TAGS[tag](obj[tag], leaf, where)
    return {k: _decode(v, leaf, _sub(where, k)) for k, v in obj.items()}


def _dedup_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (views, tied weights, ZeRO's flat buffers): copy
    # every tensor that does not own its whole storage, and the later ones of any that share one.
    seen: set[tuple[torch.device, int]] = set()
    out = {}
    for key, t in tensors.items():
        t = t.contiguous()
        storage = t.untyped_storage()
        ptr = (t.device, storage.data_ptr())
        partial = storage.nbytes() != t.numel() * t.element_size()
        out[key] = t.clone() if t.numel() and (ptr in seen or partial) else t
        seen.add(ptr)
    return out


def save_tensor_tree(tree: Any, directory: str | os.PathLike, name: str) -> None:
    """Writes ``tree`` (nested dict/list/tuple of tensors and JSON scalars) as ``name.safetensors`` +
    ``name.json`` in ``directory``. Any other object type raises ``TypeError`` naming where it sits."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, name)
    directory = Path(directory)
    save_file(_dedup_storage(tensors), str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton, allow_nan=False))


def _lookup(table: Mapping[str, Any], file: Path, found: dict[str, Any] | None = None) -> Leaf:
    def leaf(key: str, where: str) -> Any:
        if key not in table:
            raise Invalid(where, f"the name of a tensor in {file.name}", key)
        if found is not None:
            found[where or key] = table[key]
        return table[key]

    return leaf


def _read_tree(directory: Path, name: str, leaf: Leaf) -> Any:
    path = directory / f"{name}.json"
    try:
        return _decode(read_json(path), leaf, "")
    except Invalid as bad:
        raise fail(path, bad) from None


def tree_header(directory: str | os.PathLike, name: str) -> Any:
    """The tree of ``name.json`` with each tensor as its :class:`TensorMeta` from the header of
    ``name.safetensors``: checks both files and that every tensor named is there, reading no tensor data."""
    directory = Path(directory)
    file = directory / f"{name}.safetensors"
    return _read_tree(directory, name, _lookup(read_header(file)[0], file))


def load_tensor_tree(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`save_tensor_tree`. A NaN/inf in a float tensor is a :class:`CheckpointError`
    naming the file and where the tensor sits in the tree."""
    directory = Path(directory)
    file = directory / f"{name}.safetensors"
    found: dict[str, torch.Tensor] = {}
    tree = _read_tree(directory, name, _lookup(load_tensors(file, device), file, found))
    check_finite(found, file)
    return tree


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """(name -> dtype and shape, metadata) of a safetensors file, from its header alone."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            header = {k: TensorMeta(v.get_dtype(), tuple(v.get_shape())) for k, v in slices.items()}
            return header, f.metadata() or {}
    except Exception as err:  # a corrupt or foreign file: say which one
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err


def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding NaN or inf, else None."""
    return next((name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and not bool(torch.isfinite(t).all())), None)


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A :class:`CheckpointError` naming the first float tensor holding NaN or inf: weights or optimizer
    moments that are not finite would make every later step NaN."""
    name = first_nonfinite(tensors)
    if name is not None:
        what = "NaN" if bool(torch.isnan(tensors[name]).any()) else "inf"
        raise CheckpointError(f"{path}: tensor {name!r} holds {what}; training cannot go on from non-finite "
                              "values (the run had diverged before this save, or the file is damaged)")


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Loads a flat dict of tensors without ever running pickled code.

    ``.safetensors`` files go through safetensors; ``.pt``/``.pth``/``.bin`` through
    ``torch.load(weights_only=True)``, which refuses every object that is not a tensor or a plain
    container. Anything else is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except Exception as err:  # a corrupt or foreign file: say which one
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path}: refused to load; it is not a plain tensor file (torch.load weights_only=True "
                f"said: {err}). Only safetensors or weights-only torch files are loaded."
            ) from err
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        return obj
    raise CheckpointError(f"{path}: unsupported tensor file type {path.suffix!r}; use .safetensors")


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Saves a model ``state_dict`` as safetensors. Tied weights (same memory, e.g. embeddings and LM
    head) are stored once and their other names kept in the file's metadata; tensors that are views
    into a bigger buffer (ZeRO flattens parameters) are copied out first."""
    from safetensors.torch import save_file

    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        t = t.detach()
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
        )
        if key in kept and t.numel():
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t
    save_file(_dedup_storage(tensors), str(path), metadata={"aliases": json.dumps(aliases)})


def weights_header(path: str | os.PathLike) -> dict[str, TensorMeta]:
    """Every name of the ``state_dict`` :func:`save_weights` wrote (aliases included) -> dtype and shape, from
    the header; a malformed file or alias table is a :class:`CheckpointError`."""
    header, metadata = read_header(path)
    return {**header, **{name: header[target] for name, target in _aliases(path, metadata, header).items()}}


def _aliases(path: str | os.PathLike, metadata: Mapping[str, str], header: Mapping[str, Any]) -> dict[str, str]:
    where = f"{path} (metadata 'aliases')"
    try:
        aliases = parse_json(metadata.get("aliases", "{}"), where)
    except ValueError as err:  # InputError and JSONDecodeError
        raise CheckpointError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(aliases, dict) or not all(isinstance(t, str) and t in header for t in aliases.values()):
        raise CheckpointError(f"{where}: must map tensor names to tensors of the file, got {show(aliases)}")
    return aliases


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights`: every name of the original ``state_dict``, aliases restored. A NaN or
    inf in a float tensor is a :class:`CheckpointError` naming the file and the tensor."""
    header, metadata = read_header(path)
    aliases = _aliases(path, metadata, header)
    tensors = load_tensors(path, device)
    check_finite(tensors, path)
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ---- RNG state ------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and (when present) CUDA generator states as a tensor tree."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]},
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


_DTYPE_NAMES = {torch.uint8: "U8", torch.int64: "I64", torch.float32: "F32"}  # safetensors' names


def _meta_view(tree: Any) -> Any:
    """``tree`` with each tensor as its :class:`TensorMeta`, for the schemas."""
    if isinstance(tree, torch.Tensor):
        return TensorMeta(_DTYPE_NAMES.get(tree.dtype, str(tree.dtype)), tuple(tree.shape))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_meta_view(v) for v in tree)
    return {k: _meta_view(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def check_rng_state(state: Any, where: str | os.PathLike) -> None:
    """A :class:`CheckpointError` naming ``where`` and the field unless :func:`restore_rng_state` can set
    ``state``: its schema (``checkpoint_schema.rng_schema``), then a trial on fresh generators, because torch
    refuses some CPU states of the right size ("Invalid mt19937 state") and nothing global may change yet."""
    try:
        apply(rng_schema(torch.get_rng_state().numel()), _meta_view(state))
    except Invalid as bad:
        raise fail(where, bad) from None
    try:
        random.Random().setstate(_python_state(state))
        np.random.RandomState().set_state(_numpy_state(state))
        torch.Generator().set_state(state["torch"])
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:
        raise CheckpointError(f"{where}: not a valid RNG state ({err})") from None


def _python_state(state: dict) -> tuple:
    version, internal, gauss = state["python"]
    return version, tuple(internal), gauss


def _numpy_state(state: dict) -> dict:
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    return np_state


def restore_rng_state(state: dict[str, Any], where: str | os.PathLike = "RNG state") -> None:
    """Inverse of :func:`capture_rng_state`; checked first (:func:`check_rng_state`), so a bad state
    changes no generator."""
    check_rng_state(state, where)
    random.setstate(_python_state(state))
    np.random.set_state(_numpy_state(state))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError) as err:  # a state of another CUDA build or more GPUs than here
            raise CheckpointError(f"{where}: field 'cuda' cannot be set on this machine ({err})") from None


def save_rng_state(directory: str | os.PathLike, rank: int = 0) -> None:
    save_tensor_tree(capture_rng_state(), directory, f"rng.rank{rank}")


def read_rng_state(directory: str | os.PathLike, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s RNG state from ``directory``, checked (:func:`check_rng_state`) but not set."""
    state = load_tensor_tree(directory, f"rng.rank{rank}")
    check_rng_state(state, Path(directory) / f"rng.rank{rank}.json")
    return state


def load_rng_state(directory: str | os.PathLike, rank: int = 0) -> bool:
    """Restores this rank's RNG state; False (with a warning) when the checkpoint has none for it."""
    if not (Path(directory) / f"rng.rank{rank}.json").exists():
        log.warning("%s has no RNG state for rank %d; random streams start fresh", directory, rank)
        return False
    restore_rng_state(load_tensor_tree(directory, f"rng.rank{rank}"), Path(directory) / f"rng.rank{rank}.json")
    return True
