"""RL stages playing environments: a tiny model learns a multi-turn environment, PPO's critic trains on the
policy's tokens only, LoRA runs resume bit-exactly, two processes stay in lock step when their episodes
take different numbers of turns, and bad ``--env`` specs stop with one line naming the spec."""

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
from tiny_data import WORDS, train_rows, write_jsonl

from chatrlhf.checkpoint import latest_checkpoint
from chatrlhf.cli import main
from chatrlhf.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
LAUNCHER = Path(sys.executable).with_name("deepspeed")

ENV = '''
from chatrlhf.environments import Environment, Step


class YesEnv(Environment):
    """Two turns: the user asks again after the first; each reply earns its count of "yes" (at most 2), the
    first as a per-turn reward, the second as the final one."""

    max_turns = 2

    def step(self, state, reply):
        reward = float(min(reply.split().count("yes"), 2))
        state["turn"] = state.get("turn", 0) + 1
        if state["turn"] == 2:
            return Step(reward=reward, done=True, info={"correct": "yes" in reply})
        return Step(messages=[{"role": "user", "content": "again"}], reward=reward)
'''


@pytest.fixture(scope="module")
def x(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama taught by SFT to give short answers that end (so episodes reach their second turn)."""
    root = tmp_path_factory.mktemp("env")
    rng = random.Random(0)
    copy = []
    for _ in range(64):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        copy.append({"prompt": f"copy: {text}", "response": text})
    prompts = [{"prompt": f"say {WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}"} for i in range(64)]
    (root / "yes_env.py").write_text(ENV)
    model = build_tiny_llama(root / "model")
    sft = root / "sft"
    assert main(["sft", "--model.name_or_path", str(model), "--data.datasets", f"[{write_jsonl(root / 'c.jsonl', copy)}]",
                 "--data.data_split", "1,0,0", "--data.eval_fraction", "0", "--run.output_dir", str(sft),
                 "--run.progress", "false", "--engine.learning_rate", "5e-3", "--engine.micro_batch_size", "16",
                 "--max_steps", "150"]) == 0
    return {"model": str(sft / "model"), "prompts": write_jsonl(root / "p.jsonl", prompts),
            "env": f"{root / 'yes_env.py'}:YesEnv"}


def flags(x: dict, out: Path, *extra: str, command: str = "grpo") -> list[str]:
    return [command, "--env", x["env"], "--model.name_or_path", x["model"], "--data.datasets", f"[{x['prompts']}]",
            "--data.data_split", "0,0,1", "--run.output_dir", str(out), "--run.progress", "false",
            "--generation.max_new_tokens", "12", "--rollout_batch_size", "4", "--samples_per_prompt", "4",
            "--actor_engine.micro_batch_size", "8", "--actor_engine.learning_rate", "3e-3", "--kl_coef", "0.01",
            "--run.precision", "fp32", *extra]


def metric(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[f"train/{key}"] for r in rows if f"train/{key}" in r]


def test_grpo_learns_a_two_turn_environment(x, tmp_path):
    out = tmp_path / "grpo"
    # 30 iterations at lr 3e-3 on a 2-layer model are seed-sensitive: with the SFT fixture's packed forwards
    # (different float rounding) seed 42's rollouts collapse to reward 0, while seeds 1, 2 and 3 all learn.
    assert main(flags(x, out, "--max_iterations", "30", "--actor_engine.seed", "1")) == 0
    total, turns = metric(out, "reward/total"), metric(out, "env/turns")
    assert len(total) == 30 and len(turns) == 30
    first, last = sum(total[:5]) / 5, sum(total[-5:]) / 5
    assert last > first + 1.0, total  # per-turn plus final "yes" rewards: 0.1 -> about 3 seen
    assert sum(turns[-5:]) / 5 > 1.3, turns  # the episodes keep their second turn
    assert all(0 <= a <= 1 for a in metric(out, "env/accuracy"))
    summary = json.loads((out / "eval.json").read_text())
    assert summary["stage"] == "grpo"


def test_ppo_critic_on_episodes(x, tmp_path):
    out = tmp_path / "ppo"
    assert main(flags(x, out, "--max_iterations", "3", "--critic_engine.micro_batch_size", "8",
                      "--samples_per_prompt", "1", "--rollout_batch_size", "16", command="ppo")) == 0
    explained = metric(out, "value/explained_variance")
    assert len(explained) == 3 and all(v == v for v in explained)  # finite, from the policy's tokens only
    assert (out / "critic" / "config.json").is_file()


def run(argv: list[str], world: int = 1) -> subprocess.CompletedProcess:
    prefix = [str(LAUNCHER), "--num_gpus", str(world), "--no_local_rank", "--module"] if world > 1 else [
        sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*prefix, "chatrlhf.cli", *argv], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("world", [1, 2])
def test_lora_episodes_resume_bit_exact(x, tmp_path, world):
    """4 iterations straight, and 2 + a resume in a fresh process, give the same metrics and weights; with two
    processes (ZeRO-2) the ranks' episodes end after different numbers of turns and the run stays in step."""
    if world > 1 and not LAUNCHER.exists():
        pytest.skip("needs the deepspeed launcher")
    micro = str(8 // world)
    argv = flags(x, tmp_path / "unused", "--max_iterations", "4", "--model.lora_r", "4",
                 "--actor_engine.micro_batch_size", micro, "--actor_engine.zero_stage", "2" if world > 1 else "0")
    argv = argv[: argv.index("--run.output_dir")] + argv[argv.index("--run.output_dir") + 2:]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run([*argv, "--run.output_dir", str(full), "--run.save_every", "2"], world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(full, cut)
    for d in ("model", "eval.json"):
        shutil.rmtree(cut / d) if (cut / d).is_dir() else (cut / d).unlink(missing_ok=True)
    assert latest_checkpoint(cut / "checkpoints").name == "step-2"
    proc = run([*argv, "--run.output_dir", str(cut), "--run.save_every", "2", "--run.resume", "true"], world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_rows(full), train_rows(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("spec,message", [
    ("nowhere.py:Env", "--env 'nowhere.py:Env': file nowhere.py does not exist"),
    ("chatrlhf.environments.base:Step", "has no Environment subclass named 'Step'"),
    ("no_such_module_x:Env", "no module named 'no_such_module_x'"),
    ("two words", "is not an environment: use one of math, calculator, dialog"),
])
def test_bad_env_spec_is_one_line(x, tmp_path, capsys, spec, message):
    argv = flags(x, tmp_path / "out", "--max_iterations", "1")
    argv[argv.index("--env") + 1] = spec
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_env_and_reward_together_is_refused(x, tmp_path, capsys):
    assert main([*flags(x, tmp_path / "out", "--max_iterations", "1"), "--reward", "rater"]) == 2
    assert "gives the rewards: unset --reward" in capsys.readouterr().err


def test_env_needs_its_columns(x, tmp_path, capsys):
    argv = flags(x, tmp_path / "out", "--max_iterations", "1")
    argv[argv.index("--env") + 1] = "math"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no 'answer' column, which --env math reads (its data: --data.datasets demo:math_train)" in err


def test_eval_plays_the_environment(x, tmp_path, capsys):
    """``chatrlhf eval --env``: each model's accuracy, pass@k, turns and tokens, its win-rate over the one before
    and the report's table; the SFT model's short answers reach the second turn, the untrained model's do not
    end and are cut at the first."""
    base, out = build_tiny_llama(tmp_path / "base"), tmp_path / "eval"
    assert main(["eval", "--model.name_or_path", x["model"], "--name", "sft", "--baselines", f"{{base: {base}}}",
                 "--env", x["env"], "--env_data", x["prompts"], "--env_k", "3", "--gold", "false", "--limit", "6",
                 "--generation.max_new_tokens", "8", "--generation.backend", "native", "--output_dir", str(out),
                 "--progress", "false"]) == 0
    results = json.loads((out / "env_eval.json").read_text())
    assert results["rows"] == 6 and list(results["models"]) == ["base", "sft"]
    for m in results["models"].values():
        assert m["episodes"] == 6 and 0.0 <= m["accuracy"] <= m["pass@3"] <= 1.0 and m["tool_success"] is None
    assert results["models"]["sft"]["turns"] == 2.0
    assert set(results["win_rates"]) == {"sft vs base"}
    assert "## Environment" in (out / "report.md").read_text() and "| sft |" in capsys.readouterr().out


def test_math_preset_runs_sft_grpo_and_the_environment_eval(tmp_path):
    """``chatrlhf train --preset math`` end to end, shrunk to a tiny model and a few steps: SFT on the tool-use
    demonstrations, GRPO on the calculator environment (no reward model), then base, SFT and GRPO play the
    held-out problems and the report holds their table."""
    out = tmp_path / "math"
    assert main(["train", "--preset", "math", "--model.name_or_path", str(build_tiny_llama(tmp_path / "tiny")),
                 "--run.output_dir", str(out), "--run.progress", "false", "--run.precision", "fp32",
                 "--sft.max_steps", "2", "--grpo.max_iterations", "1", "--grpo.rollout_batch_size", "2",
                 "--grpo.samples_per_prompt", "2", "--grpo.actor_engine.micro_batch_size", "4",
                 "--grpo.generation.max_new_tokens", "8", "--eval.limit", "4",
                 "--eval.generation.max_new_tokens", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "grpo"} <= set(summary) and "rm" not in summary and not (out / "rm").exists()
    assert summary["sft"]["train_loss"] > 0.0 and summary["grpo"]["rollout_backend"] != "vllm"
    env = summary["environment"]
    assert env["env"] == "calculator" and env["data"] == "demo:math_eval" and env["rows"] == 4
    assert set(env["models"]) == {"base", "sft", "grpo"} and set(env["win_rates"]) == {"sft vs base", "grpo vs sft"}
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in env["models"].values())
    report = (out / "report.md").read_text()
    assert "## Environment `calculator`" in report and "### GRPO environment" in report and "Gold vs proxy" not in report
    assert (out / "plots" / "grpo_env.png").is_file()
