"""ILQL heads (Snell et al. 2022) over a causal LM trunk's hidden states: online Q heads, their Polyak-averaged
target copies, and a V head. The math they feed lives in :mod:`chatrlhf.algorithms.ilql`.

Each head is Linear(H, 2H) -> ReLU -> Linear(2H, out), out = V (vocabulary) for a Q head and 1 for the V
head. The heads read whatever hidden states they are given; for the losses pass ``hidden[:, :-1]`` (the
action positions). A saved directory holds ``ilql_heads.safetensors`` (the ``state_dict``, target heads
included, no pickle) and ``ilql_heads.json`` (hidden_size, vocab_size, two_qs).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatrlhf.algorithms.ilql import ilql_logits, polyak_update

WEIGHTS_FILE = "ilql_heads.safetensors"
CONFIG_FILE = "ilql_heads.json"


class ILQLHeadOutputs(NamedTuple):
    qs: tuple[torch.Tensor, ...]  # online Q per head, each (B, T, V)
    target_qs: tuple[torch.Tensor, ...]  # target Q per head, each (B, T, V), computed without grad
    v: torch.Tensor  # (B, T)


def _mlp(hidden_size: int, out: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear with the output layer zeroed: every Q and V starts at 0, so before training the
    ILQL policy is exactly the LM (no random shift of its logits)."""
    last = nn.Linear(2 * hidden_size, out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), last)


class ILQLHeads(nn.Module):
    """Q heads (two by default, for the min over targets), their frozen target copies and the V head.

    Initialisation draws from torch's global RNG in a fixed order (Q heads, then V), so it is deterministic
    given the seed. Target heads start equal to the online ones, have ``requires_grad`` False and move only
    through :meth:`sync_targets`; give the optimizer :meth:`trainable_parameters`.
    """

    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True):
        super().__init__()
        self.hidden_size, self.vocab_size, self.two_qs = hidden_size, vocab_size, two_qs
        self.q_heads = nn.ModuleList(_mlp(hidden_size, vocab_size) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)
        self.v_head = _mlp(hidden_size, 1)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "two_qs": self.two_qs}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The online Q heads' and the V head's parameters (the target heads are never optimised)."""
        return [*self.q_heads.parameters(), *self.v_head.parameters()]

    def forward(self, hidden: torch.Tensor) -> ILQLHeadOutputs:
        """hidden (B, T, H) -> Q per online head (B, T, V), Q per target head (B, T, V, no grad), V (B, T)."""
        qs = tuple(head(hidden) for head in self.q_heads)
        with torch.no_grad():
            target_qs = tuple(head(hidden) for head in self.target_q_heads)
        return ILQLHeadOutputs(qs, target_qs, self.v_head(hidden).squeeze(-1))

    @torch.no_grad()
    def decoding_terms(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_i Q^_i (B, T, V), V (B, T)): what decoding reads, without the online Q heads' forward."""
        return torch.stack([head(hidden) for head in self.target_q_heads]).amin(0), self.v_head(hidden).squeeze(-1)

    def sync_targets(self, alpha: float) -> None:
        """target <- (1 - alpha) target + alpha online for every Q head (alpha 1 copies)."""
        polyak_update(self.target_q_heads.parameters(), self.q_heads.parameters(), alpha)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``ilql_heads.safetensors`` and ``ilql_heads.json`` into ``directory`` (created if missing)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(root / WEIGHTS_FILE))
        (root / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        hidden_size: int | None = None,
        vocab_size: int | None = None,
        two_qs: bool | None = None,
    ) -> ILQLHeads:
        """Heads saved by :meth:`save`, on the CPU. Each of hidden_size, vocab_size, two_qs given is checked
        against ``ilql_heads.json``; a mismatch, a malformed config, or a weight whose name or shape the config
        does not predict is a ValueError naming the file and the field or tensor."""
        root = Path(directory)
        config = _read_config(root / CONFIG_FILE)
        expected = {"hidden_size": hidden_size, "vocab_size": vocab_size, "two_qs": two_qs}
        for field, want in expected.items():
            if want is not None and config[field] != want:
                raise ValueError(
                    f"{root / CONFIG_FILE}: field {field!r} is {config[field]!r} but {want!r} was expected; these "
                    f"heads were trained for another model or setting. Fix: pass {field}={config[field]!r} or "
                    "load heads saved for this model."
                )
        with torch.device("meta"):  # no random init of weights about to be replaced
            heads = cls(**config)
        weights = load_file(str(root / WEIGHTS_FILE))
        _check_weights(root / WEIGHTS_FILE, weights, heads.state_dict())
        heads.load_state_dict(weights, assign=True)
        return heads


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the ILQL heads config ({err}); save the heads with "
                         "ILQLHeads.save") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object with hidden_size, vocab_size, two_qs")
    for field in ("hidden_size", "vocab_size"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{path}: field {field!r} must be a positive integer, got {value!r}")
    if not isinstance(config.get("two_qs"), bool):
        raise ValueError(f"{path}: field 'two_qs' must be true or false, got {config.get('two_qs')!r}")
    return {field: config[field] for field in ("hidden_size", "vocab_size", "two_qs")}


def _check_weights(path: Path, weights: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    if missing := sorted(set(wanted) - set(weights)):
        raise ValueError(f"{path}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) for the config")
    if extra := sorted(set(weights) - set(wanted)):
        raise ValueError(f"{path}: unexpected tensor {extra[0]!r}; does {CONFIG_FILE} match these weights?")
    for name, tensor in weights.items():
        if tensor.shape != wanted[name].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config in "
                             f"{CONFIG_FILE} gives {tuple(wanted[name].shape)}")


class ILQLOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V) the trunk's LM logits (the behaviour policy pi_beta)
    heads: ILQLHeadOutputs  # over the action positions: Q (B, T-1, V) per head, V (B, T-1)


def _cache_kwarg(lm) -> str:
    """The LM forward's KV-cache argument (``cache`` in newer transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class ILQLModel(nn.Module):
    """A causal LM trunk and ILQL heads on its last hidden states, trained together as one module.

    ``save_pretrained`` writes the LM as a plain Hugging Face model dir (what ``chatrlhf chat`` / ``eval`` load:
    the behaviour policy) with ``ilql_heads.*`` beside its files; :func:`load_ilql` reads both back.
    """

    def __init__(self, lm: nn.Module, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = lm, heads

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False) -> ILQLOutput:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, output_hidden_states=True)
        return ILQLOutput(out.logits, self.heads(out.hidden_states[-1][:, :-1]))  # heads at positions 0..T-2

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        state = self.state_dict() if state_dict is None else state_dict
        self.lm.save_pretrained(directory, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")},
                                **kwargs)
        heads = {k[6:]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("heads.")}
        save_file(heads, str(Path(directory) / WEIGHTS_FILE))
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(self.heads.config(), indent=2) + "\n")


class ILQLPolicy(nn.Module):
    """The ILQL policy for decoding: the LM's log-probs shifted by beta (min_i Q^_i(s, .) - V(s)) (the target Q
    heads, as in the paper's and trlx's decoding), behind the forward the native sampler calls (it reads
    ``.logits`` only, so prefill, the KV cache and row dropping work unchanged). beta 0 is the plain LM.
    """

    def __init__(self, model: ILQLModel, beta: float):
        super().__init__()
        self.model, self.beta = model, beta
        self._cache = _cache_kwarg(model.lm)

    @property
    def config(self):
        return self.model.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                logits_to_keep: int = 0):
        out = self.model.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, output_hidden_states=True,
                            **{self._cache: past_key_values})
        hidden = out.hidden_states[-1]  # (B, T, H)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        q, v = self.model.heads.decoding_terms(hidden)  # (B, T', V), (B, T')
        return SimpleNamespace(logits=ilql_logits(out.logits, q, v, self.beta))


def load_ilql(directory: str | os.PathLike, dtype: str = "float32") -> ILQLModel:
    """An ``ILQLModel`` from a dir ``ILQLModel.save_pretrained`` wrote (``chatrlhf ilql``'s ``model/``)."""
    from chatrlhf.models.loading import load_causal_lm

    lm = load_causal_lm(str(directory), dtype=dtype)
    heads = ILQLHeads.load(directory, hidden_size=lm.config.hidden_size, vocab_size=lm.get_output_embeddings().weight.shape[0])
    return ILQLModel(lm, heads.to(next(lm.parameters()).dtype))
