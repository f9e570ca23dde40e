"""Mixed precision and the hybrid engine on a tiny Llama: fp32 master weights with bf16 forwards learn; the
bf16 rollout copy follows the trained weights (LoRA merged); a bf16 GRPO run learns with the mismatch logged
and truncated importance sampling on; reusing the update's forward as the old log-probs changes nothing
but the skipped pass."""

import json
from pathlib import Path

import pytest
import torch

import integration.engine_worker as worker
from chatrlhf.config import EngineConfig
from chatrlhf.engine import Engine
from chatrlhf.precision import Precision
from chatrlhf.rollout import ActorRollouts, SamplingConfig, generate
from integration.tiny_data import write_jsonl

pytestmark = pytest.mark.slow
BF16 = Precision("bf16", "test")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from chatrlhf.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def bf16_engine(model, **overrides) -> Engine:
    settings = dict(learning_rate=1e-2, warmup_steps=0, micro_batch_size=4, lr_scheduler="constant")
    settings.update(overrides)
    return Engine(model, EngineConfig(**settings), total_steps=50, precision=BF16)


def test_bf16_engine_keeps_fp32_master_weights_and_learns(tiny_dir):
    from transformers import AutoModelForCausalLM

    engine = bf16_engine(AutoModelForCausalLM.from_pretrained(tiny_dir))
    batch = worker.make_batches(engine.module.config.vocab_size, n_batches=1)
    losses = [worker.train_steps(engine, batch, 1, micro_batch_size=4)[0][0] for _ in range(12)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    state = engine._ds.optimizer.state_dict()["state"]
    assert state and all(t.dtype == torch.float32 for s in state.values() for t in s.values() if t.ndim)
    with torch.no_grad():
        assert engine(input_ids=batch[0]["input_ids"][:1]).logits.dtype == torch.bfloat16  # autocast forward


def greedy(model_or_rollouts, ids, mask, **kw):
    sampling = SamplingConfig(max_new_tokens=8, do_sample=False)
    if isinstance(model_or_rollouts, ActorRollouts):
        return model_or_rollouts.generate(ids, mask, sampling, eos_token_ids=[2], pad_token_id=2)
    return generate(model_or_rollouts, ids, mask, sampling, eos_token_ids=[2], pad_token_id=2, **kw)


def bf16_reference(engine: Engine):
    """The live (merged) weights cast to bf16, built independently of ActorRollouts."""
    from transformers import AutoModelForCausalLM

    with engine.generation_mode() as live:
        base = live.get_base_model() if hasattr(live, "get_base_model") else live
        merged = {k.replace(".base_layer.", "."): v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    model = AutoModelForCausalLM.from_config(base.config, dtype=torch.bfloat16)
    model.load_state_dict(merged)
    return model.eval()


def same(a, b) -> None:
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)


@pytest.mark.parametrize("lora", [False, True])
def test_rollout_copy_follows_the_trained_weights(tiny_dir, lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    engine = bf16_engine(model, learning_rate=3e-2)
    engine.train()
    rollouts = ActorRollouts(engine, "native", BF16)
    assert (rollouts.form, rollouts.differs) == ("copy", True)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    before = greedy(rollouts, ids, mask)
    assert rollouts._copy.dtype == torch.bfloat16
    assert engine.module.config.dtype == torch.float32  # the trained model's config (and so its saves) untouched
    same(before, greedy(bf16_reference(engine), ids, mask))
    batch = worker.make_batches(engine.module.config.vocab_size, n_batches=1)
    for _ in range(3):
        worker.train_steps(engine, batch, 1, micro_batch_size=4)
    stale = greedy(rollouts, ids, mask)  # no weights_changed(): still the copy of the old weights
    same(stale, before)
    rollouts.weights_changed()
    after = greedy(rollouts, ids, mask)
    same(after, greedy(bf16_reference(engine), ids, mask))
    assert not torch.equal(after.log_probs, before.log_probs)  # the update did reach the copy
    assert engine.module.training  # the live module is back in training mode


def grpo(tiny_dir: Path, tmp_path: Path, precision: str, *extra: str) -> list[dict]:
    from chatrlhf.cli import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over lazy dog good bad answer question hello world".split()
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {words[i % 14]} {words[(3 * i) % 14]}"}
                                                    for i in range(64)])
    out = tmp_path / f"grpo-{precision}"
    main(["grpo", "--model.name_or_path", str(tiny_dir), "--reward", "chatrlhf.rewards.examples:length_reward",
          "--data.datasets", f"[{data}]", "--data.data_split", "0,0,1", "--run.output_dir", str(out),
          "--run.progress", "false", "--gold_every", "0", "--generation.max_new_tokens", "12",
          "--generation.backend", "native", "--rollout_batch_size", "8", "--samples_per_prompt", "4",
          "--actor_engine.micro_batch_size", "8", "--actor_engine.learning_rate", "1e-2", "--kl_coef", "0.01",
          "--run.precision", precision, *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/reward/score" in r], json.loads((out / "eval.json").read_text())


def test_bf16_grpo_learns_with_the_mismatch_logged_and_corrected(tiny_dir, tmp_path):
    rows, summary = grpo(tiny_dir, tmp_path, "bf16", "--max_iterations", "12")
    assert summary["precision"]["mode"] == "bf16" and summary["rollout_form"] == "copy"
    first, last = rows[0], rows[-1]
    assert sum(r["train/reward/score"] for r in rows[-3:]) > sum(r["train/reward/score"] for r in rows[:3])
    for r in rows:  # bf16 copy vs bf16-autocast trainer: close, not equal
        assert abs(r["train/rollout/mismatch_kl"]) < 0.05
        assert 1.0 <= r["train/rollout/max_ratio"] < 2.0 and 0.5 < r["train/rollout/min_ratio"] <= 1.0
    assert first["train/rollout/max_ratio"] > 1.0 or first["train/rollout/min_ratio"] < 1.0  # a real mismatch
    assert first["train/ratio_first"] == pytest.approx(1.0, abs=1e-2) and last["train/time/update"] > 0


def test_reused_update_logprobs_skip_the_pass_and_change_nothing_else(tiny_dir, tmp_path, monkeypatch):
    from chatrlhf.stages import ppo_setup

    one_step = ("--actor_engine.gradient_accumulation_steps", "4", "--max_iterations", "3")  # 32 answers, 1 step
    calls = []
    real = ppo_setup.RLRun.reuse_update_logprobs.fget
    monkeypatch.setattr(ppo_setup.RLRun, "reuse_update_logprobs", property(lambda run: calls.append(1) or real(run)))
    reused, _ = grpo(tiny_dir, tmp_path / "a", "fp32", *one_step)
    assert calls
    for r in reused:
        # every token's ratio is exactly 1 (the same forward), so (r - 1) - log r sums to exactly 0; the mean
        # ratio is a sum of per-micro-batch shares, exact up to the rounding of that sum
        assert r["train/approx_kl"] == 0.0 and r["train/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    monkeypatch.setattr(ppo_setup.RLRun, "reuse_update_logprobs", property(lambda run: False))
    scored, _ = grpo(tiny_dir, tmp_path / "b", "fp32", *one_step)
    for a, b in zip(reused, scored):
        for key in ("train/reward/score", "train/loss/policy", "train/kl", "train/loss/kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
