"""One GRPO mini-batch step of ``chatrlhf.stages.ppo._minibatch_step`` under each ``--loss_agg``, on a fixed
experience, with 1 or 2 processes (started by tests/integration/test_loss_agg.py):

    python tests/integration/agg_worker.py --model DIR --out FILE                         (1 process)
    deepspeed --num_gpus 2 --no_local_rank tests/integration/agg_worker.py --model DIR --out FILE

Each process trains its rows of the same 8 answers (answer lengths 1-6, so the aggregations differ) in
micro-batches of 2; rank 0 writes, per mode, the step's summed statistics and the weight change. AdamW's eps is
large (1e2), so the first step moves each weight by about lr * g / eps: proportional to the gradient, which
a normal eps (a sign-like first step) would hide.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

ROWS, PROMPT, ANSWER = 8, 4, 6
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def experience(vocab_size: int, rank: int, world: int):
    """This process's rows of a fixed 8-answer experience (advantages, old and reference log-probs drawn once)."""
    from chatrlhf.stages.ppo import Experience

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (ROWS, PROMPT + ANSWER), generator=gen)
    lengths = torch.tensor([1, 6, 2, 5, 3, 6, 4, 1])
    mask = (torch.arange(ANSWER)[None, :] < lengths[:, None]).float()  # (8, R) answer tokens
    attention = torch.cat([torch.ones(ROWS, PROMPT), mask], dim=1).long()
    advantages = torch.randn(ROWS, 1, generator=gen).expand(ROWS, ANSWER) * mask
    old = -torch.rand(ROWS, ANSWER, generator=gen) * 3 * mask
    ref = old - 0.1 * torch.rand(ROWS, ANSWER, generator=gen) * mask
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    zeros = torch.zeros(ROWS, ANSWER)
    return Experience(ids[mine], attention[mine], mask[mine], torch.ones(ROWS, dtype=torch.bool)[mine], None,
                      old[mine].clone(), old[mine].clone(), ref[mine], zeros[mine], zeros[:, 0][mine], zeros[:, 0][mine],
                      advantages=advantages[mine])


def step(model_dir: str, mode: str, world: int, rank: int) -> dict:
    from chatrlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from chatrlhf.algorithms.rl import FixedKLController
    from chatrlhf.config import EngineConfig
    from chatrlhf.engine import Engine
    from chatrlhf.models import load_causal_lm
    from chatrlhf.stages.ppo import _minibatch_step
    from chatrlhf.stages.ppo_config import GRPOConfig

    local = ROWS // world
    engine_cfg = EngineConfig(micro_batch_size=2, gradient_accumulation_steps=local // 2, learning_rate=0.1,
                              adam_eps=100.0, warmup_steps=0, lr_scheduler="constant", max_grad_norm=0.0)
    cfg = GRPOConfig(loss_agg=mode, entropy_coef=0.01, actor_engine=engine_cfg)
    model = load_causal_lm(model_dir)
    before = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    actor = Engine(model, engine_cfg, total_steps=1)
    run = SimpleNamespace(cfg=cfg, actor=actor, critic=None, estimator=ADVANTAGE_ESTIMATORS["grpo"], world=world,
                          kl_ctl=FixedKLController(0.05), ptx=None, tis_cap=0.0, reuse_update_logprobs=False)
    exp = experience(model.config.vocab_size, rank, world)
    stats = _minibatch_step(run, exp, torch.arange(local), 0, 0)
    after = torch.cat([p.detach().double().flatten() for p in actor.module.parameters()])
    return {"stats": {k: v for k, v in stats.items() if k.startswith(("loss/", "entropy"))},
            "delta": (after - before).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from chatrlhf.engine import init_distributed

    rank, world = init_distributed()
    result = {mode: step(args.model, mode, world, rank) for mode in MODES}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, **result}, f)


if __name__ == "__main__":
    main()
