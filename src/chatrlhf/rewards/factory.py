"""The reward a ``--reward`` spec names, always as an ``EnsembleSource`` (every form is in docs/rewards.md).

A spec is one source or ``W1*SPEC1 + W2*SPEC2 + ...`` (a weighted ensemble, ``ensemble.py``); one source is

- a reward-model dir written by ``chatrlhf rm`` (``RewardModelSource``);
- ``encoder:DIR``, or a dir holding an encoder reward model (``EncoderSource``);
- ``rater``: the simulated rater's overall score (``RaterSource``);
- ``similarity``: MiniLM cosine similarity of the answer to the row's reference answer (``SimilaritySource``);
- ``FILE.py:function`` or ``package.module:function``: rewards as code (``FunctionSource``), per answer or batched;
- ``http://HOST:PORT/PATH`` or ``https://...``: a reward server, e.g. ``chatrlhf serve-reward`` (``RemoteSource``).

A spec of one source without a weight gives a pass-through one-term ensemble (``EnsembleSource.single``), so
the training loop holds an ensemble whatever the spec and never special-cases a lone source.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatrlhf.rewards.contract import RewardSource
from chatrlhf.rewards.ensemble import EnsembleSource, is_ensemble_spec, parse_ensemble_spec, unique_names
from chatrlhf.rewards.remote import RemoteSource, is_remote_spec
from chatrlhf.rewards.similarity import SimilaritySource
from chatrlhf.rewards.sources import (
    FUNCTION_FORM,
    EncoderSource,
    FunctionSource,
    RaterSource,
    RewardModelSource,
    is_function_spec,
)

SPEC_FORMS = (f"a reward-model dir, 'rater', 'similarity', 'encoder:DIR', {FUNCTION_FORM}, a reward server "
              "'http://HOST:PORT/PATH', or 'W1*SPEC1 + W2*SPEC2'")


def build_single_source(spec: str, policy_tokenizer, dtype: str = "float32",
                        trust_remote_code: bool = False) -> RewardSource:
    """The one source a spec without `` + `` or weight names (raises naming the spec and the forms).

    ``policy_tokenizer`` may be None (``chatrlhf serve-reward``): a reward model then re-encodes the texts."""
    if is_remote_spec(spec):
        return RemoteSource(spec)
    if spec == "rater":
        return RaterSource()
    if spec == "similarity":
        return SimilaritySource()
    if spec.startswith("encoder:"):
        return EncoderSource(spec.removeprefix("encoder:"), trust_remote_code)
    path = Path(spec)
    if is_function_spec(spec) and not path.is_dir():
        return FunctionSource(spec)
    meta = path / "chatrlhf_reward.json"
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "encoder_reward":
        return EncoderSource(spec, trust_remote_code)
    if not (path / "config.json").is_file():
        hint = " (ensemble terms are joined by ' + ', with spaces)" if "+" in spec else ""
        raise FileNotFoundError(f"reward model dir {path} not found (no config.json){hint}; pass the dir written "
                                f"by `chatrlhf rm` (its model/ subdir) or another form: {SPEC_FORMS}")
    return RewardModelSource(spec, policy_tokenizer, dtype, trust_remote_code)


def _in_term(err: Exception, message: str) -> Exception:
    """The same kind of error with ``message`` (a plain ValueError where that kind needs other arguments)."""
    try:
        return type(err)(message)
    except Exception:
        return ValueError(message)


def build_reward_source(spec: str, policy_tokenizer, dtype: str = "float32", trust_remote_code: bool = False,
                        normalize_sources: bool = True) -> EnsembleSource:
    """The ensemble a spec string names (see the module docstring and docs/rewards.md).

    An ensemble spec (terms joined by `` + `` or a ``W*`` weight prefix) gives a weighted ``EnsembleSource``;
    ``normalize_sources`` then standardises each term by its own running mean/std before weighting. Any other
    spec gives the pass-through ensemble of its one source.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f"no reward given: set --reward to {SPEC_FORMS}")
    if not is_ensemble_spec(spec):
        return EnsembleSource.single(build_single_source(spec, policy_tokenizer, dtype, trust_remote_code))
    terms = parse_ensemble_spec(spec)
    sources = []
    for i, (_, term) in enumerate(terms):
        try:
            sources.append(build_single_source(term, policy_tokenizer, dtype, trust_remote_code))
        except (ValueError, OSError, ImportError, AttributeError) as err:
            raise _in_term(err, f"reward ensemble {spec!r}, term {i + 1} {term!r}: {err}") from err
    names = unique_names([s.short_name for s in sources])
    return EnsembleSource(sources, [w for w, _ in terms], names, normalize=normalize_sources)
