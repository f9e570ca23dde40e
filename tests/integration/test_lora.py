"""LoRA (``--model.lora_r``) end to end on a tiny random Llama: SFT learns with only the adapters trainable and
saves a plain merged model whose logits equal the trained PEFT model's; PPO with a LoRA actor and critic
generates with the merged weights and saves plain models; 2 processes under ZeRO-3 merge from the
consolidated state dict; a resumed LoRA run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_data import WORDS, train_rows

from chatrlhf.cli import main
from chatrlhf.models import count_parameters
from chatrlhf.models.lora import lora_layers
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
LAUNCHER = Path(sys.executable).with_name("deepspeed")
REWARD_FN = '''
def short_yes(prompt, response, metadata):
    return min(response.split().count("yes"), 3) - 0.02 * len(response)
'''
# Tiny Llama (hidden 64, MLP 128, 4 query / 2 kv heads of 16, 2 layers): per layer the adapted linears
# q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64 hold r * (in + out) each:
# r * (128 + 96 + 96 + 128 + 192 + 192 + 192) = 1024 r, so 2048 r for the model (16384 at r = 8).
ADAPTER_PARAMS_PER_RANK = 2048


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)

    def copy_rows(n: int) -> list[dict]:
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)]
        return [{"prompt": f"copy: {t}", "response": t} for t in texts]

    def write(name: str, rows: list[dict]) -> str:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / name)

    prompts = [{"prompt": f"say {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}"} for i in range(32)]
    (root / "reward.py").write_text(REWARD_FN)
    return {
        # Embedding init std 0.1, not 0.02: LoRA leaves the (tied) embeddings and the final norm frozen, and with
        # std 0.02 a unit-RMS hidden state reaches logits of about +-1.3 at most, so no adapter could make a
        # confident prediction (loss stays near ln 384). At 0.1 the copy task is learnable through adapters.
        "model": str(build_tiny_llama(root / "model", initializer_range=0.1)),
        "copy": write("copy.jsonl", copy_rows(160)),
        "copy_small": write("copy_small.jsonl", copy_rows(32)),
        "prompts": write("prompts.jsonl", prompts),
        "reward": f"{root / 'reward.py'}:short_yes",
    }


def sft_argv(x: dict[str, str], data: str, *extra: str) -> list[str]:
    return ["sft", "--model.name_or_path", x["model"], "--model.lora_r", "8", "--data.datasets", f"[{data}]",
            "--data.data_split", "1,0,0", "--run.progress", "false", *extra]


def assert_plain(model_dir: Path) -> dict[str, torch.Tensor]:
    """The saved weights: no PEFT keys or files, every key a plain module weight."""
    weights = load_file(model_dir / "model.safetensors")
    assert not [k for k in weights if "lora_" in k or "base_layer" in k or k.startswith("base_model.")]
    assert not (model_dir / "adapter_config.json").exists()
    return weights


class EngineSpy:
    """Replaces ``Engine`` in a stage module: records each engine and its model's trainable parameter count."""

    def __init__(self, monkeypatch, stage_module):
        from chatrlhf.engine import Engine

        spy = self
        self.engines, self.trainable = [], []

        class Spy(Engine):
            def __init__(self, model, *args, **kwargs):
                spy.trainable.append(count_parameters(model, trainable_only=True))
                super().__init__(model, *args, **kwargs)
                spy.engines.append(self)

        monkeypatch.setattr(stage_module, "Engine", Spy)


def test_sft_lora_learns_trains_adapters_only_and_saves_the_merged_model(inputs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import chatrlhf.stages.sft as sft_stage

    spy = EngineSpy(monkeypatch, sft_stage)
    out = tmp_path / "sft"
    flags = ["--engine.learning_rate", "2e-2", "--engine.micro_batch_size", "8", "--engine.warmup_steps", "0",
             "--max_steps", "40"]
    assert main(sft_argv(inputs, inputs["copy"], *flags, "--run.output_dir", str(out))) == 0
    losses = [r["train/loss"] for r in train_rows(out).values()]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # measured: 5.55 -> 3.49
    ev = json.loads((out / "eval.json").read_text())
    assert ev["loss"] < 0.7 * losses[0], (ev, losses[0])  # held-out copies too

    (engine,) = spy.engines
    assert spy.trainable == [8 * ADAPTER_PARAMS_PER_RANK]
    assert sum(p.numel() for g in engine._ds.optimizer.param_groups for p in g["params"]) == 8 * ADAPTER_PARAMS_PER_RANK
    module = engine.module
    assert len(lora_layers(module)) == 14  # 7 linears x 2 layers; the (tied) LM head has none
    base = load_file(Path(inputs["model"]) / "model.safetensors")
    trained = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
               for k, v in module.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(trained[k], base[k]) for k in base)  # the frozen weights did not move

    saved = assert_plain(out / "model")
    assert saved.keys() == base.keys()
    plain, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], base[q])  # the adapters' update is in the saved weights
    ids = torch.randint(0, plain.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain.eval()(input_ids=ids).logits
        with engine.generation_mode() as merged:  # PEFT's merge_adapter: W + s * B @ A in place
            assert all(layer.merged for layer in merged.modules() if hasattr(layer, "lora_A") and layer.lora_A)
            got_merged = merged(input_ids=ids).logits
        got_adapters = module.eval()(input_ids=ids).logits  # unmerged again: W x + s * B A x
    assert not any(layer.merged for layer in module.modules() if hasattr(layer, "lora_A") and layer.lora_A)
    torch.testing.assert_close(got_merged, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_adapters, want, atol=1e-5, rtol=0)


def test_ppo_lora_actor_and_critic_generate_merged_and_save_plain_models(inputs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import chatrlhf.stages.ppo_setup as ppo_setup  # builds the actor's and critic's engines
    from chatrlhf.algorithms import gather_log_probs
    from chatrlhf.models import load_reward_model
    from chatrlhf.rollout import SamplingConfig, answer_logits, generate

    spy = EngineSpy(monkeypatch, ppo_setup)
    out = tmp_path / "ppo"
    argv = ["ppo", "--model.name_or_path", inputs["model"], "--model.lora_r", "8", "--reward", inputs["reward"],
            "--data.datasets", f"[{inputs['prompts']}]", "--data.data_split", "0,0,1", "--run.output_dir", str(out),
            "--run.progress", "false", "--gold_every", "0", "--generation.max_new_tokens", "8",
            "--rollout_batch_size", "8", "--actor_engine.micro_batch_size", "8",
            "--critic_engine.micro_batch_size", "8", "--actor_engine.learning_rate", "1e-2",
            "--critic_engine.learning_rate", "1e-2", "--max_iterations", "2", "--ema_beta", "0.5"]
    assert main(argv) == 0
    rows = [r for r in train_rows(out).values() if "train/reward/score" in r]
    assert len(rows) == 2
    assert rows[0]["train/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    actor, critic = spy.engines
    # The critic: adapters on the trunk (8 * 2048) plus its whole value head (64 weights, no bias).
    assert spy.trainable == [8 * ADAPTER_PARAMS_PER_RANK, 8 * ADAPTER_PARAMS_PER_RANK + 64]

    base = load_file(Path(inputs["model"]) / "model.safetensors")
    saved = assert_plain(out / "model")
    assert saved.keys() == base.keys()
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(saved["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    AutoModelForCausalLM.from_pretrained(out / "model")
    ema = assert_plain(out / "model_ema")  # the EMA of base + adapters, merged like the model
    assert base.keys() <= ema.keys() and ema.keys() - base.keys() <= {"lm_head.weight"}  # EMA copies untie the head
    assert not torch.equal(ema["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    AutoModelForCausalLM.from_pretrained(out / "model_ema")
    critic_saved = assert_plain(out / "critic")
    assert "score.weight" in critic_saved
    rm = load_reward_model(out / "critic").eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask, per_token=True), critic.module.eval()(ids, mask, per_token=True),
                                   atol=1e-5, rtol=0)

    # Sampling under generation_mode (adapters merged) gives the log-probs of a forward through the adapters.
    prompts = torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, do_sample=True)
    eos = actor.module.generation_config.eos_token_id
    with actor.generation_mode() as model:
        ro = generate(model, prompts, torch.ones_like(prompts), sampling, eos_token_ids=[eos], pad_token_id=eos,
                      generator=torch.Generator().manual_seed(3))
    answer = ro.response_ids
    with torch.no_grad():
        logp = gather_log_probs(answer_logits(actor.module.eval(), ro.sequences, ro.attention_mask,
                                              answer.shape[1]), answer)
    torch.testing.assert_close(logp * ro.response_mask, ro.log_probs * ro.response_mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_rm_and_dpo_with_lora_train_and_save_plain_models(stage, inputs, tmp_path):
    from chatrlhf.models import load_reward_model

    rng = random.Random(1)
    rows = []
    for _ in range(24):
        stem = " ".join(rng.choice(WORDS[:8]) for _ in range(3))
        rows.append({"prompt": f"question {stem}", "chosen": f"{stem} good", "rejected": f"{stem} bad"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / stage
    argv = [stage, "--model.name_or_path", inputs["model"], "--model.lora_r", "4", "--data.datasets", f"[{pairs}]",
            "--data.data_split", "0,1,0", "--engine.micro_batch_size", "4", "--engine.learning_rate", "1e-2",
            "--max_steps", "3", "--run.output_dir", str(out), "--run.progress", "false"]
    assert main(argv) == 0
    saved = assert_plain(out / "model")
    base = load_file(Path(inputs["model"]) / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in saved and not torch.equal(saved[q], base[q])  # adapters trained and merged
    if stage == "rm":
        assert "score.weight" in saved
        load_reward_model(out / "model")
    else:
        assert saved.keys() == base.keys()


@pytest.mark.skipif(not LAUNCHER.exists(), reason="needs the deepspeed launcher")
def test_two_process_zero3_lora_sft_saves_a_plain_merged_model(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    argv = sft_argv(inputs, inputs["copy_small"], "--engine.zero_stage", "3", "--engine.micro_batch_size", "4",
                    "--engine.learning_rate", "1e-2", "--max_steps", "2", "--run.eval_at_start", "false",
                    "--run.output_dir", str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--no_local_rank", "--module", "chatrlhf.cli", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = load_file(Path(inputs["model"]) / "model.safetensors")
    saved = assert_plain(out / "model")
    assert saved.keys() == base.keys()
    assert all(saved[k].shape == base[k].shape for k in base)  # whole tensors, not ZeRO-3 shards
    assert torch.equal(saved["model.norm.weight"], base["model.norm.weight"])  # frozen
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], base[q])  # W + s * B @ A, merged on rank 0
    _, info = AutoModelForCausalLM.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_lora_sft_resumed_in_a_fresh_process_equals_an_uninterrupted_run(inputs, tmp_path):
    """29 training records / global batch 8 = 3 steps per epoch, 2 epochs, a checkpoint at step 3; the resumed
    run starts from a copy of the uninterrupted run's checkpoint (the PEFT state dict: base + adapters)."""
    argv = sft_argv(inputs, inputs["copy_small"], "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", "4",
                    "--engine.gradient_accumulation_steps", "2", "--epochs", "2", "--run.save_every", "3")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*argv, "--run.output_dir", str(full)]) == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "model")
    (cut / "eval.json").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "chatrlhf.cli", *argv, "--run.output_dir", str(cut),
                           "--run.resume", "true"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = train_rows(full), train_rows(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = load_file(full / "checkpoints" / "step-3" / "model.safetensors")
    assert any("lora_A" in k for k in ckpt)  # checkpoints keep the adapters apart, for exact resume
