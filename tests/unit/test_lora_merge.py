"""LoRA helpers: the merge by hand, merged state dicts against PEFT's own forward (Llama and GPT-2's
transposed Conv1D), adapters on a reward model's trunk only, and ModelConfig's LoRA flags."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatrlhf.config import ConfigError, ModelConfig
from chatrlhf.models import count_parameters, load_causal_lm, load_reward_model
from chatrlhf.models.lora import (
    apply_lora,
    lora_layers,
    merge_lora_state_dict,
    merge_lora_weight,
    merged_for_save,
)
from chatrlhf.models.reward import RewardModel
from chatrlhf.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "lm"
    config = transformers.GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def _randomise_adapters(model: torch.nn.Module) -> None:
    # PEFT starts B at zero (the adapted model equals the base); a non-zero B makes the merge visible.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def test_merge_lora_weight_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 2.0]])  # (r=1, in=2)
    b = torch.tensor([[1.0], [3.0]])  # (out=2, r=1)
    # B @ A = [[1, 2], [3, 6]]; W + 0.5 B A = [[1.5, 1], [1.5, 4]]; transposed delta: [[1.5, 1.5], [1, 4]]
    torch.testing.assert_close(merge_lora_weight(w, a, b, 0.5), torch.tensor([[1.5, 1.0], [1.5, 4.0]]), rtol=0, atol=0)
    torch.testing.assert_close(merge_lora_weight(w, a, b, 0.5, fan_in_fan_out=True),
                               torch.tensor([[1.5, 1.5], [1.0, 4.0]]), rtol=0, atol=0)
    assert merge_lora_weight(w.bfloat16(), a, b, 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shape"):
        merge_lora_weight(torch.zeros(3, 2), a, b, 1.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_state_dict_gives_the_adapted_models_logits(arch, tiny_dir, gpt2_dir):
    path = tiny_dir if arch == "llama" else gpt2_dir
    cfg = ModelConfig(name_or_path=str(path), lora_r=4, lora_alpha=8)
    peft_model = apply_lora(load_causal_lm(path), cfg)
    _randomise_adapters(peft_model)
    layers = lora_layers(peft_model)
    assert layers and all(info.scale == 2.0 for info in layers.values())  # alpha / r
    assert any(info.fan_in_fan_out for info in layers.values()) == (arch == "gpt2")  # GPT-2's Conv1D is (in, out)
    model, state = merged_for_save(peft_model)
    assert model is peft_model.get_base_model()
    assert merge_lora_state_dict(state, layers) is state  # merging a merged state dict changes nothing
    plain = load_causal_lm(path).eval()
    plain.load_state_dict(state, strict=True)  # exactly the base model's keys
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())  # the live model was not touched
    assert count_parameters(peft_model, trainable_only=True) == sum(
        p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_reward_model_lora_on_the_trunk_head_trainable_saved_merged(tiny_dir, tmp_path):
    rm = RewardModel.from_causal_lm(tiny_dir, head_init_std=0.3)
    rm.gradient_checkpointing_enable()
    assert apply_lora(rm, ModelConfig(lora_r=2)) is rm
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "model.score.weight" in trainable and all("lora_" in n for n in trainable - {"model.score.weight"})
    assert count_parameters(rm, trainable_only=True) == 2 * 2048 + 64  # tiny Llama: 2048 per rank, head 64
    ids, mask = torch.randint(0, 384, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    rm(ids, mask).sum().backward()  # through checkpointed layers, into the adapters
    assert all(p.grad is not None for n, p in rm.named_parameters() if "lora_A" in n)
    _randomise_adapters(rm)
    rm.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), rm.eval()(ids, mask), rtol=0, atol=1e-5)


def test_apply_lora_off_and_unknown_targets(tiny_dir):
    model = load_causal_lm(tiny_dir)
    assert apply_lora(model, ModelConfig(lora_r=0)) is model
    with pytest.raises(ValueError, match=r"--model.lora_target_modules: nope matched no module.*has: .*q_proj"):
        apply_lora(model, ModelConfig(lora_r=2, lora_target_modules=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="lm_head, the LM head .* tied"):
        apply_lora(model, ModelConfig(lora_r=2, lora_target_modules=["lm_head"]))
    peft_model = apply_lora(load_causal_lm(tiny_dir), ModelConfig(lora_r=2, lora_target_modules=["q_proj"]))
    assert len(lora_layers(peft_model)) == 2  # one per layer


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("lora_r", -1, "--model.lora_r"),
    ("lora_alpha", 0.0, "--model.lora_alpha"),
    ("lora_alpha", float("nan"), "--model.lora_alpha"),
    ("lora_dropout", 1.0, "--model.lora_dropout"),
    ("lora_target_modules", [], "--model.lora_target_modules"),
    ("lora_target_modules", ["q_proj", ""], "--model.lora_target_modules"),
])
def test_model_config_rejects_bad_lora_values(field, value, flag):
    ModelConfig(lora_r=8).validate()
    with pytest.raises(ConfigError, match=flag):
        ModelConfig(**{field: value}).validate()
