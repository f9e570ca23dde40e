"""Loading causal LMs and their tokenizers: built-in names, local HF dirs or hub ids.

Every stage goes through these three functions, so the rules live in one place:

* ``trust_remote_code`` is off unless the caller passes ``True`` (a model dir's Python must not run
  just because a path was given).
* A tokenizer always has a pad token (eos when the model defines none, logged) and a chat template
  (an error with the fix otherwise), because prompts are built with ``apply_chat_template``.
* Models come back in train mode with their ``generation_config`` (eos = end-of-turn token).
* A local dir is checked before transformers reads it (``check_model_dir``), so a missing or broken
  ``config.json``, a config that asks for remote code, a corrupt weights file or a pickled weights file
  that is not plain tensors stops with a ``ModelDirError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch

from chatrlhf.models.default import builtin_names, ensure_builtin

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelDirError(ValueError):
    """A model dir cannot be used as given; the message names the dir or file and what would fix it."""


_TRUST_FLAG = "--model.trust_remote_code true"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{path} is not valid JSON ({err}). Fix: restore the file from the model's source "
                            "(or save the model again with save_pretrained).") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} holds a JSON {type(data).__name__}, not an object. Fix: restore the file "
                            "from the model's source.")
    return data


def _refuse_remote_code(path: Path, data: dict, trust_remote_code: bool) -> None:
    # transformers would load a known model_type with its built-in class and ignore auto_map, which
    # silently gives a different model than its author shipped; so refuse, and say both ways out.
    auto_map = data.get("auto_map")
    if auto_map and not trust_remote_code:
        classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
        raise ModelDirError(
            f"{path} has 'auto_map' ({classes}): this model needs Python code shipped with it, and running it "
            f"is off. Fix: pass {_TRUST_FLAG} if you trust the code in {path.parent}, or delete 'auto_map' "
            "from the file to load it with transformers' built-in class for its model_type."
        )


def _check_weight_files(root: Path) -> None:
    """Reads the header of every safetensors file: a truncated or foreign file fails here, by name."""
    from safetensors import safe_open

    for file in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type, or OSError
            raise ModelDirError(
                f"{file} is not a readable safetensors file ({err}); it is truncated or corrupt. Fix: copy it "
                "again from the model's source (or save the model again with save_pretrained)."
            ) from None


_SIZE_FIELDS = {  # field -> the names model families give it
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab": ("vocab_size",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
}


def _size_field(path: Path, config: dict, kind: str) -> int | None:
    name = next((n for n in _SIZE_FIELDS[kind] if config.get(n) is not None), None)
    if name is None:
        return None
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelDirError(f"{path}: '{name}' must be a positive integer, got {str(value)[:40]}. Fix: restore the "
                            "file from the model's source.")
    return value


def estimate_parameters(path: Path, config: dict) -> int | None:
    """Parameters of a decoder from its config.json (embeddings, attention and a gated MLP per layer; within
    about 20% for Llama/Qwen/GPT-2-like models); None when the config lacks the sizes (encoder-decoders...)."""
    hidden, layers, vocab = (_size_field(path, config, k) for k in ("hidden", "layers", "vocab"))
    if None in (hidden, layers, vocab):
        return None
    intermediate = _size_field(path, config, "intermediate") or 4 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (4 * hidden * hidden + 3 * hidden * intermediate)


def _check_size(path: Path, config: dict) -> None:
    """Refuses, before any weight is allocated, a model whose weights alone would not fit in the memory this
    machine has free: transformers would otherwise spend minutes building (or swapping) it, then die."""
    import psutil

    params = estimate_parameters(path, config)
    if params is None:
        return
    need, free = params * 2, psutil.virtual_memory().available  # bf16 at the least; training needs ~8x more
    if need > free:
        sizes = ", ".join(f"{n}={config[n]}" for names in _SIZE_FIELDS.values() for n in names if n in config)
        raise ModelDirError(f"{path} describes a model of about {params:.3g} parameters ({need / 2**30:.1f} GiB even "
                            f"in bf16; {sizes}), more than the {free / 2**30:.1f} GiB of memory free here. Fix: "
                            "check those sizes in config.json, or use a machine with more memory.")


def check_model_dir(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                    require_config: bool = True) -> None:
    """Checks a local model dir before transformers reads it; hub ids and built-in names pass through.

    Raises ``ModelDirError`` for: no ``config.json`` (with ``require_config``), a ``config.json`` or
    ``tokenizer_config.json`` that is not a JSON object, an ``auto_map`` (remote code) in either while
    ``trust_remote_code`` is off, sizes in ``config.json`` that are not positive integers or describe a model
    larger than the free memory, or a safetensors weights file whose header cannot be read.
    """
    root = Path(resolve_model(name_or_path))
    if not root.is_dir():
        return
    config = root / "config.json"
    if not config.is_file() and require_config:
        raise ModelDirError(
            f"model dir {root} has no config.json, so it is not a Hugging Face model dir. Fix: point at the dir "
            "that holds config.json (for a chatrlhf run: its model/ subdir)."
        )
    for name in ("config.json", "tokenizer_config.json"):
        if (root / name).is_file():
            data = _read_json(root / name)
            _refuse_remote_code(root / name, data, trust_remote_code)
            if name == "config.json":  # checked for the tokenizer too, which reads it
                _check_size(root / name, data)
    if require_config:
        _check_weight_files(root)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Maps a model reference to what ``from_pretrained`` takes.

    A built-in name (``smollm2-135m-instruct``, ``tiny-random-llama``) becomes its cache dir (built on
    first use); an existing dir is returned as an absolute path; anything that looks like a
    filesystem path but does not exist is an error; the rest is passed through as a hub id.
    """
    ref = os.fspath(name_or_path)
    if ref in builtin_names():
        return str(ensure_builtin(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise NotADirectoryError(f"Model path {ref} is a file; pass the directory holding config.json.")
    # Hub ids are "name" or "org/name"; anything else was meant as a local path that is missing.
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref:
        raise FileNotFoundError(
            f"Model dir {ref} does not exist. Pass an existing HF model dir, a hub id (org/name) or a "
            f"built-in name: {', '.join(builtin_names())}."
        )
    return ref


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or short forms, or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_tokenizer(
    name_or_path: str | os.PathLike,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    require_chat_template: bool = True,
):
    """Loads the tokenizer of a causal LM with a pad token and (by default) a chat template.

    ``padding_side`` is "right" for training batches and "left" for batched generation.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    path = resolve_model(name_or_path)
    check_model_dir(path, trust_remote_code, require_config=False)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(
                f"Tokenizer of {path} has neither a pad nor an eos token; add `eos_token` (the end-of-turn "
                "token) to its tokenizer_config.json."
            )
        # Masks always come from attention_mask, so pad == eos is safe here (see docs/models.md).
        tok.pad_token = tok.eos_token
        logger.info("tokenizer of %s has no pad token; using eos %r as pad", path, tok.eos_token)
    if require_chat_template and not tok.chat_template:
        raise ValueError(
            f"Tokenizer of {path} has no chat template, and prompts are built with apply_chat_template. "
            "Use an instruct/chat model, or add one: set `tokenizer.chat_template` (e.g. ChatML) and "
            f"save it, which writes chat_template.jinja into the model dir."
        )
    return tok


def load_causal_lm(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
):
    """Loads a causal LM in train mode, with its generation_config (pad filled from eos if missing)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    check_model_dir(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except pickle.UnpicklingError as err:
        # torch.load(weights_only=True) refused a pickled object that is not a plain tensor; nothing ran.
        files = ", ".join(p.name for p in sorted(Path(path).glob("*.bin")) + sorted(Path(path).glob("*.pt")))
        # torch's text goes on to suggest allow-listing the global, which is exactly what not to do here
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "not plain tensors")
        reason = reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
        raise ModelDirError(
            f"refused to load the weights {files or '(pickle)'} in {path}: the pickle holds objects other than "
            f"tensors, which would run code when loaded ({reason}). Fix: use a safetensors copy of the weights "
            "from a trusted source (save_pretrained writes model.safetensors)."
        ) from None
    gen = model.generation_config
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode; stages switch explicitly where it matters
    return model


def enable_checkpointing(model) -> None:
    """Turns on activation (gradient) checkpointing, non-reentrant: it works with frozen inputs (LoRA,
    frozen embeddings) and ZeRO-3. transformers 5 renamed the method; older versions have the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # the KV cache is useless during training and clashes with recompute


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied tensors counted once (``parameters()`` de-duplicates them).

    Under ZeRO-3 a partitioned parameter has ``numel() == 0`` locally; its full size is ``ds_numel``.
    """
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability to 0 (``nn.Dropout`` layers and attention dropout attributes), so
    a training-mode forward computes exactly what an eval-mode one does (PPO's first ratio is then 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def uses_flash_attention(model) -> bool:
    """Whether ``model`` (or an engine's module) attends with a flash-attention kernel, which finds packed rows
    from restarting position ids (``chatrlhf.data.packing``) and takes no 4-D mask; SDPA and eager take one."""
    module = getattr(model, "module", model)
    return "flash" in (getattr(getattr(module, "config", None), "_attn_implementation", None) or "")
