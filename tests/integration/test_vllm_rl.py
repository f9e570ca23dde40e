"""RL with the vLLM backend (``--generation.backend vllm``) on a tiny random Llama (head_dim 32, which vLLM's
CPU attention supports): a GRPO run learns a rule reward with the actor's weights pushed into vLLM after
every update, and a run resumed from its checkpoint continues as the uninterrupted one.

Skips without vllm, unless CHATRLHF_REQUIRE_VLLM=1 (CI), where it fails."""

import json
import os
import shutil
from pathlib import Path

import pytest

from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.rollout import vllm_engine as ve
from integration.tiny_data import train_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module", autouse=True)
def _vllm():
    if not ve.vllm_available():
        if os.environ.get("CHATRLHF_REQUIRE_VLLM") == "1":
            pytest.fail(f"CHATRLHF_REQUIRE_VLLM=1 but vllm is not installed: run {ve.INSTALL_HINT}", pytrace=False)
        pytest.skip(f"vllm is not installed ({ve.INSTALL_HINT})")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm-rl")
    model = build_tiny_llama(root / "model", seed=0, num_attention_heads=2, num_key_value_heads=1)
    words = "the quick brown fox jumps over lazy dog good bad answer question hello world".split()
    data = write_jsonl(root / "prompts.jsonl", [{"prompt": f"say {words[i % 14]} {words[(3 * i) % 14]}"}
                                                for i in range(64)])
    return {"model": str(model), "data": data}


def grpo_args(x: dict, out: Path, iterations: int) -> list[str]:
    return ["grpo", "--model.name_or_path", x["model"], "--reward", "chatrlhf.rewards.examples:length_reward",
            "--data.datasets", f"[{x['data']}]", "--data.data_split", "0,0,1", "--run.output_dir", str(out),
            "--run.progress", "false", "--run.precision", "fp32", "--generation.backend", "vllm",
            "--gold_every", "0", "--generation.max_new_tokens", "12", "--rollout_batch_size", "8",
            "--samples_per_prompt", "4", "--actor_engine.micro_batch_size", "8",
            "--actor_engine.learning_rate", "1e-2", "--kl_coef", "0.01", "--max_iterations", str(iterations)]


def test_grpo_with_vllm_learns_a_rule_reward(inputs, tmp_path):
    out = tmp_path / "run"
    assert main(grpo_args(inputs, out, 10)) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["rollout_backend"], summary["rollout_form"]) == ("vllm", "vllm")
    r = list(train_rows(out).values())
    assert sum(x["train/reward/score"] for x in r[-3:]) > sum(x["train/reward/score"] for x in r[:3]) + 0.1, r
    for x in r:  # fp32 vLLM vs the fp32 trainer: the same policy up to kernel rounding, so weights stay ~1
        assert abs(x["train/rollout/mismatch_kl"]) < 1e-3
        assert x["train/rollout/max_ratio"] < 1.01 and x["train/rollout/min_ratio"] > 0.99


def test_resume_with_vllm_continues_as_the_uninterrupted_run(inputs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*grpo_args(inputs, full, 4), "--run.save_every", "2"]) == 0
    # What a run killed right after its step-2 save leaves: the checkpoint and the metrics, no final model.
    shutil.copytree(full, cut)
    for d in ("model", "eval.json"):
        shutil.rmtree(cut / d) if (cut / d).is_dir() else (cut / d).unlink()
    assert main([*grpo_args(inputs, cut, 4), "--run.save_every", "2", "--run.resume", "true"]) == 0
    resumed, uninterrupted = train_rows(cut), train_rows(full)
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4]
    for step in (3, 4):  # a new vLLM engine, given the checkpoint's weights, samples the same answers
        x, y = uninterrupted[step], resumed[step]
        for key in ("train/reward/score", "train/loss/policy", "train/kl", "train/response_length"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (step, key)


def test_auto_falls_back_to_native_for_a_model_vllm_cannot_run(inputs, tmp_path):
    tiny16 = build_tiny_llama(tmp_path / "head16", seed=0)  # head_dim 16: no vLLM CPU attention kernel
    out = tmp_path / "run"
    argv = grpo_args({**inputs, "model": str(tiny16)}, out, 1)
    argv[argv.index("--generation.backend") + 1] = "auto"
    argv[argv.index("--run.precision") + 1] = "bf16"
    assert main(argv) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["rollout_backend"], summary["rollout_form"]) == ("native", "copy")
    argv[argv.index("--generation.backend") + 1] = "vllm"  # asked for by name: the error, not a fallback
    assert main([*argv, "--run.overwrite", "true"]) != 0
