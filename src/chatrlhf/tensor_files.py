"""Tensor files without pickle: model weights, tensor trees (an optimizer ``state_dict``) and RNG states.

Nothing here unpickles: tensors are read with safetensors (or ``torch.load(weights_only=True)`` for
foreign ``.pt``/``.bin`` files), everything else is JSON. A tensor tree (an optimizer ``state_dict``,
the RNG states) is stored as ``NAME.safetensors`` (the tensors) plus ``NAME.json`` (the skeleton).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrlhf.checkpoint import CheckpointError, read_json

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


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


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


def load_tensor_tree(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`save_tensor_tree`."""
    directory = Path(directory)
    skeleton = read_json(directory / f"{name}.json")
    return _decode(skeleton, load_tensors(directory / f"{name}.safetensors", device))


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


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights`: every name of the original ``state_dict``, aliases restored."""
    from safetensors import safe_open

    tensors = load_tensors(path, device)
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
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


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(directory: str | os.PathLike, rank: int = 0) -> None:
    save_tensor_tree(capture_rng_state(), directory, f"rng.rank{rank}")


def load_rng_state(directory: str | os.PathLike, rank: int = 0) -> bool:
    """Restores this rank's RNG state; False (with a warning) when the checkpoint has none for it."""
    if not (Path(directory) / f"rng.rank{rank}.json").exists():
        log.warning("%s has no RNG state for rank %d; random streams start fresh", directory, rank)
        return False
    restore_rng_state(load_tensor_tree(directory, f"rng.rank{rank}"))
    return True
