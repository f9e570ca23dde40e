"""LoRA adapters (Hu et al. 2021, via PEFT): training, and saving them merged into a plain model dir.

With ``--model.lora_r R > 0`` every targeted linear layer ``y = W x`` becomes ``y = W x + s * B A x`` with
``A`` (R, in) drawn at random, ``B`` (out, R) zero (so training starts from the base model exactly) and
``s = lora_alpha / R``. Only ``A`` and ``B`` train; ``W`` stays frozen.

* A causal LM (SFT, DPO, the RL actor) is wrapped with ``peft.get_peft_model`` (task ``CAUSAL_LM``), whose
  ``merge_adapter`` / ``unmerge_adapter`` the engine uses to decode with fused weights.
* A reward, rating or value model (``trunk`` + ``head``) gets adapters injected into its trunk in place;
  the head is new (or task-specific) and stays fully trainable.
* A saved model is always plain: :func:`merged_for_save` turns a state dict with PEFT keys (the live
  module's, or one consolidated from ZeRO-3 shards) into the base model's keys with ``W + s * B @ A``
  folded in, without touching the live weights, so training can go on after a save.

Resumable checkpoints keep the PEFT state dict as it is (base weights and adapters under PEFT's names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ADAPTER = "default"  # PEFT's name of the (only) adapter
_PEFT_PREFIX = "base_model.model."  # a PeftModel's state-dict keys = this + the wrapped model's keys


@dataclass(frozen=True)
class LoraLayerInfo:
    """What merging one adapted linear layer needs: its scale ``s`` and whether its weight is stored
    transposed ((in, out), GPT-2's ``Conv1D``) rather than (out, in)."""

    scale: float
    fan_in_fan_out: bool = False


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      fan_in_fan_out: bool = False) -> torch.Tensor:
    """The merged weight ``W + scale * B @ A`` (transposed delta when ``fan_in_fan_out``), in ``weight``'s dtype.

    ``weight`` (out, in) — or (in, out) with ``fan_in_fan_out`` —, ``lora_a`` (r, in), ``lora_b`` (out, r).
    The product is taken in fp32 so a bf16 model loses nothing beyond the final rounding.

    Example (by hand): W = [[1, 0], [0, 1]], A = [[1, 2]] (r=1), B = [[1], [3]], scale 0.5:
    B @ A = [[1, 2], [3, 6]], so W + 0.5 B A = [[1.5, 1], [1.5, 4]]; with fan_in_fan_out the delta is
    transposed: [[1.5, 1.5], [1, 4]].
    """
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    if fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(f"LoRA delta B @ A has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}")
    return (weight.float() + scale * delta).to(weight.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLayerInfo]:
    """Module name (= state-dict key prefix) -> :class:`LoraLayerInfo` for every LoRA layer of ``model``.

    Empty for a model without adapters. Reads module attributes only, so it works on every rank under ZeRO-3.
    """
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        if module.use_dora.get(ADAPTER, False):
            raise NotImplementedError(f"{name}: DoRA adapters cannot be merged by chatrlhf; use plain LoRA")
        found[name] = LoraLayerInfo(float(module.scaling[ADAPTER]), bool(getattr(module, "fan_in_fan_out", False)))
    return found


def merge_lora_state_dict(state: dict[str, torch.Tensor], layers: dict[str, LoraLayerInfo]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA layers (``P.base_layer.weight``, ``P.lora_A.default.weight``, ...) -> the same
    model's plain state dict (``P.weight`` merged, ``P.bias``), the other keys unchanged. ``layers`` from
    :func:`lora_layers` of the module the state came from. Without adapter keys (or ``layers``), ``state`` is
    returned as is, so merging twice is harmless."""
    if not layers or not any(".lora_A." in key for key in state):  # no adapters, or merged already
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".base_layer." in key:  # the frozen linear inside a LoRA layer: its weight is merged below
            prefix, _, rest = key.rpartition(".base_layer.")
            if rest != "weight":
                out[f"{prefix}.{rest}"] = value
        elif ".lora_" in key:  # adapter weights: folded into the base weight, not saved
            prefix = key[: key.index(".lora_")]
        else:
            out[key] = value
            continue
        if prefix not in layers:
            raise ValueError(f"state dict key {key} belongs to no LoRA layer of the model it is merged for")
    for prefix, info in layers.items():
        try:
            weight = state[f"{prefix}.base_layer.weight"]
            lora_a = state[f"{prefix}.lora_A.{ADAPTER}.weight"]
            lora_b = state[f"{prefix}.lora_B.{ADAPTER}.weight"]
        except KeyError as err:
            raise ValueError(f"state dict lacks {err} of the LoRA layer {prefix}: it is not this model's") from None
        out[f"{prefix}.weight"] = merge_lora_weight(weight, lora_a, lora_b, info.scale, info.fan_in_fan_out)
    return out


def merged_for_save(module: nn.Module, state: dict[str, torch.Tensor] | None = None):
    """``(model, state)`` such that ``model.save_pretrained(dir, state_dict=state)`` writes a plain HF dir:
    adapters merged into the weights, the base model's key names, no PEFT files.

    ``state``: the module's full state (e.g. consolidated from ZeRO-3 shards); None reads ``module.state_dict()``
    (the live weights must then be whole). Without adapters, returns ``(module, state)`` unchanged. The live
    module is never modified, so training continues after a save.
    """
    layers = lora_layers(module)
    if not layers:
        return module, state
    merged = merge_lora_state_dict(module.state_dict() if state is None else state, layers)
    if hasattr(module, "get_base_model"):  # a PeftModel: save the transformers model it wraps
        return module.get_base_model(), {k.removeprefix(_PEFT_PREFIX): v for k, v in merged.items()}
    return module, merged


def merged_live_state(module: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(model, state)``: the transformers model and its weights under its own key names, for a module whose
    adapters are merged *in place* right now (``merge_adapter``, as in the engine's generation mode): PEFT's
    prefix and ``.base_layer`` dropped, the adapters' own tensors left out. Without adapters, the module's
    state dict. The tensors are the live ones (no copy): read them before unmerging."""
    if not lora_layers(module):
        return module, module.state_dict()
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    state = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            continue
        state[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return base, state


def lora_config(cfg, task_type: str | None):
    """The ``peft.LoraConfig`` for a :class:`chatrlhf.config.ModelConfig` (``lora_r`` > 0)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # "all-linear": every nn.Linear of the attention and MLP blocks, never the output (LM) head
        target_modules=list(cfg.lora_target_modules) if cfg.lora_target_modules else "all-linear",
        bias="none",
        task_type=task_type,
    )


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """Adds LoRA adapters as ``cfg`` (a ``ModelConfig``) says; ``cfg.lora_r == 0`` returns ``model`` untouched.

    A causal LM comes back wrapped in a ``PeftModelForCausalLM``, only its adapters trainable. A reward,
    rating or value model (one with ``trunk`` and ``head``) comes back as the same object with adapters
    injected into its trunk: the trunk's own weights frozen, the head fully trainable. Activation checkpointing
    set before keeps working: it is non-reentrant, so frozen inputs still carry gradients to the adapters.
    """
    if cfg.lora_r == 0:
        return model
    from peft import get_peft_model, inject_adapter_in_model

    trunk, head = getattr(model, "trunk", None), getattr(model, "head", None)
    if isinstance(trunk, nn.Module) and isinstance(head, nn.Module):
        _check_targets(trunk, cfg)
        inject_adapter_in_model(lora_config(cfg, None), trunk)
        for name, param in trunk.named_parameters():
            param.requires_grad_("lora_" in name)
        head.requires_grad_(True)
        return model
    _check_targets(model, cfg)
    # Adapters in the base model's dtype (PEFT would upcast bf16 ones to fp32): DeepSpeed's bf16/fp16 engines
    # train parameters of one dtype and keep their own fp32 master copies.
    return get_peft_model(model, lora_config(cfg, "CAUSAL_LM"), autocast_adapter_dtype=False)


def _matches(target: str, key: str) -> bool:
    return key == target or key.endswith(f".{target}")  # PEFT's rule for a list of target names


def _check_targets(model: nn.Module, cfg) -> None:
    """Every name in ``lora_target_modules`` must match a module the way PEFT matches a list (the full name,
    or its last dotted parts): PEFT itself only stops when none matches, so a typo in one name would pass."""
    names = cfg.lora_target_modules or []
    modules = [key for key, _ in model.named_modules()]
    missing = [n for n in names if not any(_matches(n, key) for key in modules)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        # A saved model ties the head to the embeddings again: a merged update of the head would be lost.
        head_name = next(key for key, m in model.named_modules() if m is head)
        if any(_matches(n, head_name) for n in names):
            raise ValueError(f"--model.lora_target_modules names {head_name}, the LM head of {cfg.name_or_path}, "
                             "which is tied to the input embeddings. Fix: leave it out of the list.")
    if missing:
        linear = sorted({key.rsplit(".", 1)[-1] for key, m in model.named_modules()
                         if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(
            f"--model.lora_target_modules: {', '.join(missing)} matched no module of {cfg.name_or_path}. Fix: "
            f"name linear layers of this model (it has: {', '.join(linear)}), or leave the flag unset for every "
            "linear layer of the attention and MLP blocks."
        )
