"""The generate phase of an RL iteration in rounds: ``generate_answers`` is one round (the prompts' answers or
an environment's episodes); ``sample_informative`` runs DAPO's dynamic sampling for the group estimators
(``--dynamic_sampling``; Yu et al. 2025, arXiv 2503.14476, section 3.2; verl's ``algorithm.filter_groups``).

Round 0 answers the iteration's own prompts with its own sampling generator, exactly as without dynamic
sampling; each further round answers as many prompts again, drawn by ``refill_round``. Every round is rewarded
at once; the group estimators' input (``penalised_scores``, plus an environment's per-turn rewards) decides
which groups are informative (``chatrlhf.algorithms.dynamic_sampling.informative_groups``: rewards not all
equal). While any process holds fewer than its ``rollout_batch_size / processes`` and rounds are left, every
process runs another round: the decision is all-reduced, so generation, which ZeRO-3 and lock-step decoding
need every rank to join, stays in step (a process already full generates too, and discards). Each process
then keeps its first informative groups and fills what is missing with all-equal ones (``pick_groups``), so
every process trains on the same number of rows. The old and reference log-probs are computed afterwards
(``stages.ppo.score_rollouts``), on the kept rows only.
"""

from __future__ import annotations

import numpy as np
import torch

from chatrlhf.algorithms import rl
from chatrlhf.algorithms.dynamic_sampling import informative_groups, pick_groups
from chatrlhf.data.encode import eos_id
from chatrlhf.rewards.contract import RewardBatch
from chatrlhf.rollout import Rollout, decode_responses
from chatrlhf.rollout.types import stack_rows
from chatrlhf.stages.ppo_env import generate_episodes

LIST_KEYS = ("prompts", "responses", "meta", "episodes")
"""A round's per-row lists that travel with the kept rows (``episodes``: an environment's)."""


def generate_answers(run, prompt_indices, gen: torch.Generator) -> tuple[Rollout, dict]:
    """One round: ``samples_per_prompt`` answers (or an environment's episodes) to each of ``prompt_indices``,
    in order, sampled with ``gen`` from the actor's live weights in inference mode; and the collated prompt
    batch they answer."""
    cfg, actor = run.cfg, run.actor
    items = [run.prompts[i] for i in prompt_indices for _ in range(cfg.samples_per_prompt)]
    if run.env is not None:  # a group's episodes start from the same row, as its answers do
        return generate_episodes(run, items, gen)
    batch = {k: v.to(actor.device) if torch.is_tensor(v) else v for k, v in run.collate(items).items()}
    rollout = run.rollouts.generate(batch["input_ids"], batch["attention_mask"], cfg.generation.sampling(),
                                    eos_token_ids=[eos_id(run.tokenizer)], pad_token_id=run.tokenizer.pad_token_id,
                                    generator=gen, sync=actor.all_done if run.world > 1 else None)
    return rollout, batch


def refill_round(n_prompts: int, count: int, seed: int, iteration: int, round_: int,
                 rank: int) -> tuple[list[int], torch.Generator]:
    """(prompt indices, sampling generator) of round ``round_`` >= 1 on process ``rank``: ``count`` indices into
    the training prompts, without replacement while there are enough, and the generator its answers are
    sampled with. Both are a pure function of (seed, iteration, round, rank), through one
    ``numpy.random.SeedSequence``: no state is kept or advanced, so the plan's prompt stream and a resumed
    run's draws are those of a run without dynamic sampling."""
    prompt_seq, sampling_seq = np.random.SeedSequence([seed % 2**64, iteration, round_, rank]).spawn(2)
    indices = np.random.default_rng(prompt_seq).choice(n_prompts, size=count, replace=count > n_prompts)
    return indices.tolist(), torch.Generator().manual_seed(int(sampling_seq.generate_state(1, np.uint64)[0]))


def reward_batch(run, rollout: Rollout, batch: dict) -> RewardBatch:
    """What the reward source reads: the rollout, its prompts, answer texts (an episode's: its last reply),
    finished flags and the rows' meta."""
    responses = batch.get("responses") or decode_responses(run.tokenizer, rollout)
    return RewardBatch(rollout.sequences, rollout.attention_mask, batch["prompts"], responses,
                       rollout.finished.tolist(), batch.get("meta", []))


def penalised_scores(cfg, raw_scores: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """(B,) the reward source's scores less ``missing_eos_penalty`` for an answer cut off without EOS, plus
    DAPO's ``overlong_penalty`` within ``overlong_buffer`` tokens of ``max_new_tokens``."""
    scores = raw_scores - cfg.missing_eos_penalty * (~rollout.finished).float()
    if cfg.overlong_buffer:
        scores = scores + rl.overlong_penalty(rollout.response_mask.float().sum(-1), cfg.generation.max_new_tokens,
                                              cfg.overlong_buffer, cfg.overlong_penalty).to(scores.device)
    return scores


def sample_informative(run, iteration: int, prompts: list[int], generator: torch.Generator) -> tuple[Rollout, dict]:
    """This process's rollouts of the iteration under dynamic sampling, and their batch (``LIST_KEYS``, the
    reward source's ``raw_scores`` (B,), an environment's ``turn_rewards`` (B, R), and ``sampling``: this
    process's counts for ``ppo_metrics.sampling_metrics``). Round 0 answers ``prompts`` with ``generator``."""
    cfg, k, target = run.cfg, run.cfg.samples_per_prompt, len(prompts)
    rounds: list[tuple[Rollout, dict]] = []
    informative: list[bool] = []
    where: list[tuple[int, int]] = []  # each group generated so far: (round, group within the round)
    while True:
        rollout, batch = generate_answers(run, prompts, generator)
        rewarded = reward_batch(run, rollout, batch)
        raw = run.reward(rewarded).float()  # on every process, full or not: a source may gather over processes
        outcome = penalised_scores(cfg, raw, rollout)  # what the group estimators compare (before normalising)
        if batch.get("turn_rewards") is not None:
            outcome = outcome + batch["turn_rewards"].sum(-1).to(outcome.device)
        informative += informative_groups(outcome, k).tolist()
        where += [(len(rounds), g) for g in range(len(rollout) // k)]
        rounds.append((rollout, {**batch, "responses": rewarded.responses, "raw_scores": raw}))
        short = float(sum(informative) < target)
        if len(rounds) == cfg.max_sampling_rounds or run.actor.all_reduce(torch.tensor([short])).item() == 0:
            break
        prompts, generator = refill_round(len(run.prompts), target, cfg.actor_engine.seed, iteration, len(rounds),
                                          run.rank)
    kept, filled = pick_groups(informative, target)
    rollout, batch = _keep(run, rounds, [where[j] for j in sorted(kept + filled)], k)
    first = rounds[0][1]["raw_scores"]
    batch["sampling"] = {"rounds": len(rounds), "groups": len(informative), "informative": sum(informative),
                         "filled": len(filled), "first_reward_sum": float(first.double().sum()),
                         "first_answers": first.numel()}
    return rollout, batch


def _keep(run, rounds: list[tuple[Rollout, dict]], groups: list[tuple[int, int]], k: int) -> tuple[Rollout, dict]:
    """The rows of ``groups`` ((round, group) pairs, in round order) as one rollout and one batch."""
    rows: list[list[int]] = [[] for _ in rounds]
    for r, g in groups:
        rows[r] += range(g * k, (g + 1) * k)
    rollout = stack_rows([(part, picked) for (part, _), picked in zip(rounds, rows)], run.tokenizer.pad_token_id)
    batches = [b for _, b in rounds]
    out = {key: [b[key][i] for b, picked in zip(batches, rows) for i in picked]
           for key in LIST_KEYS if all(key in b for b in batches)}
    out["raw_scores"] = torch.cat([b["raw_scores"][picked] for b, picked in zip(batches, rows)])
    if batches[0].get("turn_rewards") is not None:  # (B, R) right-padded to the kept rollout's width
        width = rollout.response_ids.shape[1]
        out["turn_rewards"] = torch.cat([torch.nn.functional.pad(b["turn_rewards"][picked],
                                                                 (0, width - b["turn_rewards"].shape[1]))
                                         for b, picked in zip(batches, rows)])
    return rollout, out
