"""The reward sources: the judges a reward spec can name (``chatrlhf.rewards.factory`` parses the spec).

- ``RewardModelSource``: a reward-model dir written by ``chatrlhf rm`` (decoder trunk + scalar head). When it
  shares the policy's tokenizer it scores the rollout's token ids directly; otherwise the texts are
  re-encoded with its own tokenizer and chat template;
- ``EncoderSource``: ``encoder:DIR``, an encoder reward model with its own tokenizer, scoring text pairs;
- ``RaterSource``: ``rater``, the simulated rater's overall score (the demo's gold judge);
- ``FunctionSource``: ``FILE.py:function`` or ``package.module:function``, rewards as code, in one of two forms:
  per answer, ``function(prompt: str, response: str, metadata: dict) -> float``, or batched (TRL's form),
  ``function(prompts: list, completions: list, **columns) -> list[float]`` for a function marked ``@batched``
  or having a parameter named ``completions`` (``is_batched``; examples in ``examples.py``).

The similarity source sits in ``similarity.py``. Every source runs without gradients and leaves the models it
holds in eval mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path

import torch

from chatrlhf.rewards.contract import RewardBatch, RewardSource, prompt_texts


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.chat_template == tok_b.chat_template


class RewardModelSource(RewardSource):
    """A decoder reward model's score at the answer's last real token."""

    needs_placement = True

    def __init__(self, path: str, policy_tokenizer, dtype: str = "float32", trust_remote_code: bool = False):
        from chatrlhf.models import load_reward_model, load_tokenizer

        self.name, self.short_name = f"rm:{path}", "rm"
        self.path = path
        self.model = load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, padding_side="right")
        # No policy tokenizer (``chatrlhf serve-reward`` receives texts, not token ids): the text path.
        self.shares_tokenizer = policy_tokenizer is not None and _same_vocab(self.tokenizer, policy_tokenizer)
        self.critic_init = path if self.shares_tokenizer else None

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        if self.shares_tokenizer:
            return self.model(batch.sequences, batch.attention_mask).float().cpu()
        from chatrlhf.data.encode import answer_ids, encode_prompt

        seqs = [encode_prompt(self.tokenizer, p, 10**9) + answer_ids(self.tokenizer, r)
                for p, r in zip(batch.prompts, batch.responses)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return self.model(ids, mask).float().cpu()


class EncoderSource(RewardSource):
    """An encoder reward model (own tokenizer) reading ``prompt [SEP] response`` text."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        from chatrlhf.models import load_encoder_reward_model

        self.name, self.short_name = f"encoder:{path}", "encoder"
        self.model = load_encoder_reward_model(path, trust_remote_code=trust_remote_code).eval()

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return self.model.score_texts(batch.prompts, batch.responses).float()


def _harmful(meta: dict) -> bool | None:
    value = meta.get("harmful") if meta else None
    return None if value is None else bool(value)


def rater_inputs(batch: RewardBatch) -> tuple[list[str], list[bool] | None, list[bool]]:
    """(prompt texts, harmful flags or None, truncated flags) for ``SimulatedRater.score``."""
    texts = prompt_texts(batch)
    flags = [_harmful(m) for m in batch.meta] if batch.meta else []
    harmful = flags if flags and all(f is not None for f in flags) else None
    return texts, harmful, [not f for f in batch.finished]


class RaterSource(RewardSource):
    """The simulated rater's overall score in [0, 1] (``chatrlhf.rewards.rater``)."""

    name = short_name = "rater"
    is_gold_judge = True

    def __init__(self, rater=None):
        from chatrlhf.rewards.rater import SimulatedRater

        self.rater = rater or SimulatedRater()

    def score(self, batch: RewardBatch):
        texts, harmful, truncated = rater_inputs(batch)
        return self.rater.score(texts, batch.responses, harmful, truncated)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return torch.tensor([s.overall for s in self.score(batch)], dtype=torch.float32)


# ------------------------------------------------------------------------------------- rewards as code
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")  # a dotted module path: package.module
FUNCTION_FORM = "FILE.py:function or package.module:function"


def is_function_spec(spec: str) -> bool:
    """Whether ``spec`` has the form ``FILE.py:function`` or ``package.module:function``."""
    where, _, fn_name = spec.rpartition(":")
    return fn_name.isidentifier() and (where.endswith(".py") or bool(_MODULE.fullmatch(where)))


def _module_from_file(file: Path, spec: str):
    if not file.is_file():
        raise FileNotFoundError(f"reward function file {file} does not exist (from reward spec {spec!r}); "
                                f"pass an existing {FUNCTION_FORM}")
    module_spec = importlib.util.spec_from_file_location(f"chatrlhf_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ImportError(f"reward spec {spec!r}: running {file} failed with {type(err).__name__}: {err}") from err
    return module


def _module_from_name(name: str, spec: str):
    try:
        found = importlib.util.find_spec(name)
    except ImportError:  # a parent package is missing
        found = None
    if found is None:
        raise ModuleNotFoundError(f"reward spec {spec!r}: no module named {name!r} can be imported; install it, "
                                  "add its folder to PYTHONPATH, or name the file instead (FILE.py:function)")
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise ImportError(f"reward spec {spec!r}: importing {name} failed with {type(err).__name__}: {err}") from err


def load_reward_function(spec: str) -> Callable:
    """The function a ``FILE.py:function`` or ``package.module:function`` spec names (raises naming the spec)."""
    where, _, fn_name = spec.rpartition(":")
    if not is_function_spec(spec):
        raise ValueError(f"reward spec {spec!r} is not of the form {FUNCTION_FORM}")
    module = _module_from_file(Path(where), spec) if where.endswith(".py") else _module_from_name(where, spec)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {where} has no function {fn_name!r}; define "
                             f"{fn_name}(prompt: str, response: str, metadata: dict) -> float there")
    return fn


def _as_reward(value, spec: str, row: int) -> float:
    """``value`` as a finite float, or an error naming the spec, the batch row and the value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(f"reward function {spec} returned {value!r} ({type(value).__name__}) for row {row} of the "
                     "batch; it must return a finite number (int or float, not NaN or inf)")


BATCHED_ATTR = "chatrlhf_batched"
"""The attribute ``batched`` sets on a function (True): ``FunctionSource`` then calls it once per batch."""


def batched(fn: Callable) -> Callable:
    """Marks ``fn(prompts, completions, **columns) -> list[float]`` as a batched reward function.

    Usage: ``@chatrlhf.rewards.batched`` above the ``def``. The function itself is returned (with
    ``fn.chatrlhf_batched = True``), so it stays callable as written.
    """
    setattr(fn, BATCHED_ATTR, True)
    return fn


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins and C functions have no signature to read
        return None


def is_batched(fn: Callable) -> bool:
    """Whether ``FunctionSource`` calls ``fn`` once per batch: it is marked ``@batched``, or it has a parameter
    named ``completions`` (TRL's name, so TRL reward functions work unchanged). Otherwise once per answer."""
    return bool(getattr(fn, BATCHED_ATTR, False)) or "completions" in (_parameters(fn) or {})


def batch_columns(meta: list[dict], finished: list[bool], n: int) -> dict[str, list]:
    """The rows' extra columns as lists of ``n`` (None where a row lacks the column), plus ``finished``.

    Example: meta ``[{"reference": "a"}, {"reference": "b", "id": 2}]``, finished ``[True, False]`` ->
    ``{"reference": ["a", "b"], "id": [None, 2], "finished": [True, False]}``.
    """
    rows = meta or [{} for _ in range(n)]
    names = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order
    columns = {k: [row.get(k) for row in rows] for k in names}
    columns["finished"] = list(finished)
    return columns


def _as_rewards(values, spec: str, n: int) -> list[float]:
    """A batched function's return as ``n`` finite floats, or an error naming the spec (and the row)."""
    if hasattr(values, "tolist") and not isinstance(values, numbers.Real):  # a tensor or NumPy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"batched reward function {spec} returned {values!r:.80} ({type(values).__name__}); "
                         f"it must return a list of {n} finite numbers, one per answer")
    if len(values) != n:
        raise ValueError(f"batched reward function {spec} returned {len(values)} scores for a batch of {n} answers; "
                         f"it must return one finite number per answer, in the order of `completions`")
    return [_as_reward(v, spec, i) for i, v in enumerate(values)]


class FunctionSource(RewardSource):
    """Rewards as code, in one of two forms (``is_batched`` tells which; docs/rewards.md):

    - per answer, ``function(prompt, response, metadata) -> float``: ``prompt`` is the prompt as text
      (``prompt_texts``); ``metadata`` is the row's meta plus ``finished`` (False when the answer was cut at the
      token limit);
    - batched, ``function(prompts=[...], completions=[...], **columns) -> list[float]``, called once per batch
      with keyword arguments as TRL calls its reward functions: ``prompts`` the prompt texts, ``completions``
      the answer texts, ``columns`` the rows' extra columns and ``finished`` as lists (``batch_columns``); a
      function without ``**kwargs`` gets only the arguments it names (``def f(completions)`` gets no prompts).
    """

    def __init__(self, spec: str):
        self.fn = load_reward_function(spec)
        self.name, self.short_name = f"fn:{spec}", spec.rpartition(":")[2]
        self.spec = spec
        self.batched = is_batched(self.fn)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        out = self._call_batched(batch) if self.batched else self._call_each(batch)
        return torch.tensor(out, dtype=torch.float32)  # (B,)

    def _call_each(self, batch: RewardBatch) -> list[float]:
        texts = prompt_texts(batch)
        metas = batch.meta or [{} for _ in texts]
        out = []
        for i, (prompt, response, meta) in enumerate(zip(texts, batch.responses, metas)):
            try:
                value = self.fn(prompt, response, {**meta, "finished": batch.finished[i]})
            except Exception as err:
                raise RuntimeError(f"reward function {self.spec} raised {type(err).__name__} on row {i} of the "
                                   f"batch (prompt {prompt[:80]!r}): {err}") from err
            out.append(_as_reward(value, self.spec, i))
        return out

    def _call_batched(self, batch: RewardBatch) -> list[float]:
        n = len(batch.responses)
        columns = batch_columns(batch.meta, batch.finished, n)
        for taken in ("prompts", "completions"):
            if taken in columns:
                raise ValueError(f"batched reward function {self.spec}: the data has a column named {taken!r}, "
                                 f"which would replace the {taken} argument; rename that column")
        arguments = {"prompts": prompt_texts(batch), "completions": list(batch.responses), **columns}
        params = _parameters(self.fn)
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            arguments = {k: v for k, v in arguments.items() if k in params}  # no **kwargs: only what it names
        try:
            values = self.fn(**arguments)
        except Exception as err:
            raise RuntimeError(f"batched reward function {self.spec} raised {type(err).__name__} on a batch of {n} "
                               f"answers (called as f(prompts=..., completions=..., **columns) because it is "
                               f"marked @batched or has a 'completions' parameter): {err}") from err
        return _as_rewards(values, self.spec, n)
