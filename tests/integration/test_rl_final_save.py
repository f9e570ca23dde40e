"""``resume.save_rl_final``'s ``model_ema/``: published whole by one rename like ``model/`` (a save that fails
midway leaves an earlier ``model_ema/`` as it was, and no scratch), and never written from NaN/inf weights.

The actor is a stand-in holding a tiny Llama (``save_rl_final`` reads its module and rank; ``Engine.save_hf``,
which writes ``model/``, has its own tests), so no DeepSpeed engine is started."""

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from chatrlhf.engine import NonFiniteError
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.resume import save_rl_final

pytestmark = pytest.mark.slow


@pytest.fixture
def run(tmp_path):
    """(out dir, actor stand-in, tokenizer, EMA of the actor's weights)."""
    source = build_tiny_llama(tmp_path / "tiny")
    actor = SimpleNamespace(module=LlamaForCausalLM.from_pretrained(source), is_rank_0=True,
                            save_hf=lambda directory, tokenizer: None)
    ema = SimpleNamespace(shadow={k: v.detach().clone().float() for k, v in actor.module.state_dict().items()})
    return tmp_path / "run", actor, AutoTokenizer.from_pretrained(source), ema


def _save(out, actor, tokenizer, ema) -> dict:
    return save_rl_final(out, actor, None, ema, tokenizer, [], n_iters=1, kl_coef=0.1, estimator="gae")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_model_ema_holds_the_ema_weights_and_a_failed_save_keeps_the_earlier_one(run, monkeypatch):
    out, actor, tokenizer, ema = run
    _save(out, actor, tokenizer, ema)
    saved = load_file(out / "model_ema" / "model.safetensors")
    assert saved.keys() and all(torch.equal(saved[k], ema.shadow[k]) for k in saved)
    earlier = _files(out / "model_ema")

    def disk_fills(directory, state_dict):  # half a weights file written, then the disk is full
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(actor.module, "save_pretrained", disk_fills)
    ema.shadow = {k: v + 1 for k, v in ema.shadow.items()}
    (out / "eval.json").unlink()
    with pytest.raises(OSError, match="No space left"):
        _save(out, actor, tokenizer, ema)
    assert _files(out / "model_ema") == earlier
    assert sorted(p.name for p in out.iterdir()) == ["model_ema"], "the failed save left scratch or eval.json"


def test_nonfinite_ema_weights_are_refused_by_name_and_nothing_is_written(run):
    out, actor, tokenizer, ema = run
    _save(out, actor, tokenizer, ema)
    earlier = _files(out / "model_ema")
    (out / "eval.json").unlink()
    ema.shadow["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"EMA weights .*first: model\.layers\.1\.mlp\.up_proj\.weight"):
        _save(out, actor, tokenizer, ema)
    assert _files(out / "model_ema") == earlier
    assert sorted(p.name for p in out.iterdir()) == ["model_ema"]
