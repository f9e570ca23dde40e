"""Training on CUDA: SFT, PPO and GRPO smoke runs in bf16 through the CLI, and DeepSpeed ZeRO-2 on one GPU.

Small on purpose (a tiny random Llama, a few steps): they check that every stage runs on a GPU in bf16 and
that its numbers are sane, not how well it learns (the CPU suite checks that)."""

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (bench/gpu_check.sh on the GPU machine)")]

WORDS = "the quick brown fox jumps over lazy dog good bad yes no answer question hello world".split()
REWARD_FN = '''
def short_yes(prompt, response, metadata):
    """1 per word "yes" in the answer (at most 3), minus 0.02 per character: a dense rule reward."""
    return min(response.split().count("yes"), 3) - 0.02 * len(response)
'''


def bf16_flags() -> list[str]:
    """Mixed precision where the run has the flag (fp32 master weights, bf16 forwards), else bf16 weights."""
    from chatrlhf.config import RunConfig

    if "precision" in {f.name for f in fields(RunConfig)}:
        return ["--run.precision", "bf16"]
    return ["--model.dtype", "bfloat16"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def metric(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def run_cli(argv: list[str]) -> None:
    from chatrlhf.cli import main

    torch.cuda.reset_peak_memory_stats()
    assert main(argv) == 0
    assert torch.cuda.max_memory_allocated() > 0  # the stage really ran on the GPU


def common(model: Path, data: str, out: Path, split: str) -> list[str]:
    return ["--model.name_or_path", str(model), "--data.datasets", f"[{data}]", "--data.data_split", split,
            "--run.output_dir", str(out), "--run.progress", "false", *bf16_flags()]


def test_sft_bf16_on_cuda_loss_falls(tiny_dir, tmp_path):
    rows = []
    for i in range(96):
        text = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 5))
        rows.append({"prompt": f"copy: {text}", "response": text})
    out = tmp_path / "sft"
    run_cli(["sft", *common(tiny_dir, write_jsonl(tmp_path / "copy.jsonl", rows), out, "1,0,0"),
             "--engine.learning_rate", "3e-3", "--engine.micro_batch_size", "8", "--engine.warmup_steps", "0",
             "--max_steps", "30"])
    losses = metric(out, "train/loss")
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert (out / "model" / "config.json").is_file()


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    data = write_jsonl(root / "prompts.jsonl", [{"prompt": f"say {WORDS[i % 16]} {WORDS[(3 * i) % 16]}"}
                                                for i in range(64)])
    fn = root / "reward.py"
    fn.write_text(REWARD_FN)
    return data, f"{fn}:short_yes"


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_bf16_on_cuda_runs(tiny_dir, rl_setup, tmp_path, algo):
    data, reward = rl_setup
    out = tmp_path / algo
    group = ["--rollout_batch_size", "4", "--samples_per_prompt", "4"] if algo == "grpo" else \
        ["--rollout_batch_size", "16", "--critic_engine.micro_batch_size", "8",
         "--critic_engine.learning_rate", "3e-3"]
    run_cli([algo, *common(tiny_dir, data, out, "0,0,1"), "--reward", reward, "--gold_every", "0",
             "--generation.max_new_tokens", "12", "--generation.backend", "native",
             "--actor_engine.micro_batch_size", "8",
             "--actor_engine.learning_rate", "3e-3", "--kl_coef", "0.01", "--max_iterations", "3", *group])
    scores = metric(out, "train/reward/score")
    assert len(scores) == 3 and all(math.isfinite(x) for x in scores)
    assert all(math.isfinite(x) and abs(x) < 1e3 for x in metric(out, "train/kl"))
    # bf16 rollouts vs the trainer's forward: the first ratio is close to 1, not exactly 1
    assert all(abs(x - 1.0) < 0.1 for x in metric(out, "train/ratio_first"))
    assert (out / "model" / "config.json").is_file()
    assert (out / "critic" / "config.json").is_file() == (algo == "ppo")


def _token_nll(engine, batch: dict) -> torch.Tensor:
    """Mean next-token NLL over real tokens (right padding masked)."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    valid = batch["attention_mask"][:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                            reduction="none")  # (B, T-1)
    return (nll * valid).sum() / valid.sum()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero2_engine_on_one_gpu_loss_falls(tiny_dir, dtype):
    """DeepSpeed ZeRO-2 (partitioned gradients and optimizer state; one partition here) on a fixed batch:
    the loss falls, the gradient norm is finite, and the weights live on the GPU."""
    from transformers import AutoModelForCausalLM

    from chatrlhf.config import EngineConfig
    from chatrlhf.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=getattr(torch, dtype))
    engine = Engine(model, EngineConfig(zero_stage=2, learning_rate=1e-2, warmup_steps=0, micro_batch_size=8),
                    total_steps=12, dtype=dtype)
    assert engine.device.type == "cuda" and next(engine.module.parameters()).is_cuda
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (8, 24), generator=gen)
    mask = (torch.arange(24)[None] < torch.randint(12, 25, (8, 1), generator=gen)).long()
    batch = {"input_ids": ids.to(engine.device), "attention_mask": mask.to(engine.device)}
    losses = []
    for _ in range(12):
        loss = _token_nll(engine, batch)
        engine.backward(loss)
        assert engine.step()
        losses.append(float(loss))
    assert engine.optimizer_steps == 12 and math.isfinite(engine.grad_norm)
    assert losses[-1] < 0.7 * losses[0], losses
