"""A PPO iteration at the demo's settings, phase by phase: the landed defaults vs the new ones, in one run.

Both sides are real ``chatrlhf ppo`` runs (one process each, one after the other, same prompts and seed) at
the PPO settings ``chatrlhf train`` uses (SmolLM2-135M-Instruct actor, 16 prompts per iteration, 96 new
tokens, micro-batch 8, a critic initialised from the reward model):

    landed   --run.precision fp32 --generation.backend native: exact fp32 everywhere, rollouts from the
             live weights (what chatrlhf did before mixed precision)
    new      the defaults: --run.precision auto, --generation.backend auto (printed by the run);
             --backends native,vllm runs one "new" side per backend instead

``--landed-flags`` / ``--new-flags`` replace the landed side's flags and add flags to every new side, to
compare other settings the same way, e.g. padded against packed forwards in fp32 on the native sampler:

    bench/ppo_iteration.py --landed-flags "--run.precision fp32 --generation.backend native
        --actor_engine.packing false --critic_engine.packing false" --new-flags "--run.precision fp32" --backends native

The reward model is SmolLM2 with a seeded random value head (the timing does not depend on what it
scores). Each phase's time comes from the run's own metrics (``time/generate``, ``time/score``,
``time/update``, ``time/iteration``); the first ``--warmup`` iterations are dropped, medians reported.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_iteration.py [--iterations 4 --warmup 1 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_description, markdown_table

LANDED = ["--run.precision", "fp32", "--generation.backend", "native"]
PHASES = ("generate", "score", "update", "iteration")


def make_reward_model(model: str, out: Path) -> Path:
    import torch

    from chatrlhf.models import RewardModel, load_tokenizer
    from chatrlhf.models.loading import resolve_model

    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(resolve_model(model))
    rm.save_pretrained(out, tokenizer=load_tokenizer(model))
    return out


def run_side(name: str, flags: list[str], args, workdir: Path, reward: Path) -> tuple[list[dict], str]:
    out = workdir / name
    cmd = [sys.executable, "-m", "chatrlhf.cli", "ppo", "--model.name_or_path", args.model, "--reward", str(reward),
           "--data.datasets", "[demo:prompts_train]", "--data.data_split", "0,0,1", "--run.output_dir", str(out),
           "--run.progress", "false", "--gold_every", "0", "--max_iterations", str(args.iterations),
           "--kl_coef", "0.1", "--missing_eos_penalty", "0.1", "--generation.max_new_tokens", str(args.max_new_tokens),
           "--actor_engine.learning_rate", "1.5e-5", "--critic_engine.learning_rate", "5e-5",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("CHATRLHF_PRECISION", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    chosen = " | ".join(line.removeprefix("[chatrlhf] ") for line in proc.stdout.splitlines()
                        if line.startswith(("[chatrlhf] precision", "[chatrlhf] rollouts")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/time/iteration" in r], chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--backends", default="auto", help="comma-separated --generation.backend of the new sides")
    p.add_argument("--landed-flags", default=" ".join(LANDED), help="the landed side's flags")
    p.add_argument("--new-flags", default="", help="flags added to every new side")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    print(machine_description(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        reward = make_reward_model(args.model, workdir / "rm")
        sides = {"landed": args.landed_flags.split()}
        for backend in args.backends.split(","):
            sides["new" if backend == "auto" else f"new ({backend})"] = ["--generation.backend", backend,
                                                                         *args.new_flags.split()]
        results = {}
        for name, flags in sides.items():
            rows, chosen = run_side(name, flags, args, workdir, reward)
            timed = rows[args.warmup:] or rows
            results[name] = {phase: statistics.median(r[f"train/time/{phase}"] for r in timed) for phase in PHASES}
            results[name]["chosen"] = chosen
            results[name]["mismatch_kl"] = statistics.mean(r.get("train/rollout/mismatch_kl", 0.0) for r in timed)
            print(f"{name} ({' '.join(flags)}): {chosen}", flush=True)
    new = [n for n in results if n != "landed"]
    table = [[phase, f"{results['landed'][phase]:.2f}",
              *(f"{results[n][phase]:.2f} ({results['landed'][phase] / results[n][phase]:.2f}x)" for n in new)]
             for phase in PHASES]
    print(markdown_table(["phase (median s per iteration)", "landed", *(f"{n} (speed-up)" for n in new)], table))
    print("rollout/mismatch_kl (mean): " + ", ".join(f"{n} {r['mismatch_kl']:.2e}" for n, r in results.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
