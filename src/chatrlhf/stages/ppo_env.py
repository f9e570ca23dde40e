"""An RL stage's rollouts when it plays an environment (``--env``): episodes instead of single answers.

``generate_episodes`` plays the iteration's episodes with the actor's rollout engine (every turn through
``ActorRollouts.generate``: live weights, a bf16 copy or vLLM) and lays them out as one ``Rollout``: the
policy's tokens in ``response_mask``, the environment's turns in the context only. ``EnvironmentScores`` is
the run's reward source then: each episode's final reward, read from the batch. ``episode_metrics`` are the
iteration's accuracy, tool-call and length figures.
"""

from __future__ import annotations

import torch

from chatrlhf.data.encode import eos_id
from chatrlhf.environments import Environment
from chatrlhf.environments.episodes import Episode, run_episodes, to_rollout
from chatrlhf.rewards.contract import RewardBatch, RewardSource
from chatrlhf.rollout import Rollout

SCORE_KEY = "episode_score"
"""The key of ``RewardBatch.meta`` holding an episode's final reward."""


class EnvironmentScores(RewardSource):
    """The reward of an RL run on an environment: each episode's final reward, as the environment gave it."""

    def __init__(self, spec: str):
        self.name, self.short_name = f"env:{spec}", "env"
        self.sources, self.logged_parts = [], {}

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return torch.tensor([m[SCORE_KEY] for m in batch.meta], dtype=torch.float32)


def check_rows(env: Environment, spec: str, records: list[dict]) -> None:
    """Every prompt row has the columns the environment reads (``required_columns``) and passes its
    ``check_row``, or an error names the first row that does not (and the environment's own data)."""
    for i, rec in enumerate(records):
        meta = rec.get("meta", {})
        missing = [c for c in env.required_columns if c not in meta]
        where = f"{rec.get('_source', 'the prompt data')}, row {rec.get('_row', i + 1)}"
        if missing:
            data = getattr(env, "train_data", None)
            fix = f" (its data: --data.datasets {data})" if data else ""
            raise ValueError(f"{where} has no {missing[0]!r} column, which --env {spec} reads{fix}")
        problem = env.check_row({"prompt": rec["prompt"], **meta})
        if problem:
            raise ValueError(f"{where}: {problem} (--env {spec})")


def generate_episodes(run, items: list[dict], generator: torch.Generator) -> tuple[Rollout, dict]:
    """(the episodes as a ``Rollout``, the batch the scoring reads: opening messages, rows' meta with the
    final rewards, the last replies, per-turn rewards (B, R) and the episodes)."""
    cfg, actor, tok = run.cfg, run.actor, run.tokenizer
    rows = [{"prompt": item["prompt"], **item.get("meta", {})} for item in items]

    def generate(ids, mask, sampling):
        return run.rollouts.generate(ids.to(actor.device), mask.to(actor.device), sampling,
                                     eos_token_ids=[eos_id(tok)], pad_token_id=tok.pad_token_id, generator=generator,
                                     sync=actor.all_done if run.world > 1 else None)

    episodes = run_episodes(run.env, rows, tok, generate, cfg.generation.sampling(), eos_id(tok),
                            cfg.env_max_turns, cfg.env_max_tokens, actor.all_done if run.world > 1 else None)
    rollout, turn_rewards = to_rollout(episodes, tok.pad_token_id)
    rollout = Rollout(*(t.to(actor.device) for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                                     rollout.response_mask, rollout.finished, rollout.log_probs,
                                                     rollout.context_mask)))
    meta = [{**item.get("meta", {}), SCORE_KEY: e.score} for item, e in zip(items, episodes)]
    batch = {"prompts": [e.messages[: e.opening] for e in episodes], "meta": meta,
             "responses": [(e.replies or [""])[-1] for e in episodes], "turn_rewards": turn_rewards.to(actor.device),
             "episodes": episodes}
    return rollout, batch


def episode_metrics(run, episodes: list[Episode]) -> dict[str, float]:
    """Means over all processes' episodes: ``env/turns``, ``env/tokens`` (after the prompt, both sides); when
    the environment reports ``info["correct"]``, ``env/accuracy``; with tools, ``env/tool_calls`` (per episode)
    and ``env/tool_success`` (the share of calls that ran)."""
    judged = [e for e in episodes if "correct" in e.info]
    local = torch.tensor([[len(episodes), sum(e.turns for e in episodes), sum(len(e.ids) for e in episodes),
                           len(judged), sum(bool(e.info["correct"]) for e in judged),
                           sum(e.info.get("tool_calls", 0) for e in episodes),
                           sum(e.info.get("tool_errors", 0) for e in episodes)]], dtype=torch.float64)
    n, turns, tokens, n_judged, correct, calls, errors = run.actor.all_reduce(local)[0].tolist()
    row = {"env/turns": turns / max(n, 1.0), "env/tokens": tokens / max(n, 1.0)}
    if n_judged:
        row["env/accuracy"] = correct / n  # an episode cut before the environment judged it counts as wrong
    if run.env.tools:
        row.update({"env/tool_calls": calls / max(n, 1.0), "env/tool_success": (calls - errors) / max(calls, 1.0)})
    return row
