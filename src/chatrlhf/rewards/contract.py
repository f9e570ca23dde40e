"""The reward contract: what a reward source is given (``RewardBatch``) and what it offers (``RewardSource``).

Every module of ``chatrlhf.rewards`` imports this one and nothing here imports them back, so the package's
imports point one way: contract <- sources <- ensemble <- factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from chatrlhf.models.encoder import prompt_text


@dataclass
class RewardBatch:
    """What a reward source may look at: the token ids and the texts of each (prompt, answer)."""

    sequences: torch.Tensor
    """(B, P+R) prompt + answer ids in the policy's vocabulary (left-padded prompt, right-padded answer)."""
    attention_mask: torch.Tensor
    """(B, P+R) 1 on real tokens (the answer's EOS included)."""
    prompts: list[list[dict]]
    """Prompt messages (ending with the user turn)."""
    responses: list[str]
    """Answer texts (special tokens removed)."""
    finished: list[bool]
    """Whether each answer ended with EOS (False: cut at the token limit)."""
    meta: list[dict] = field(default_factory=list)
    """Per-prompt metadata: the data row's extra columns (e.g. ``harmful``, ``keywords``, ``reference``; a
    preference row converted to a prompt also carries its ``chosen`` answer)."""


def prompt_texts(batch: RewardBatch) -> list[str]:
    """Each prompt as text: a single user turn as its content, a conversation as ``role: content`` lines."""
    return [prompt_text(p[-1]["content"] if len(p) == 1 else p) for p in batch.prompts]


class RewardSource(Protocol):
    """One call, ``source(batch) -> scores (B,)``, plus what the training loop may ask of a source.

    The training loop reads the capabilities below instead of testing a source's class. The sources of this
    package subclass the protocol to inherit its defaults (a text judge: nothing to save, no model to place).
    """

    name: str
    """The spec the source came from; logged as the run's reward."""
    short_name: str
    """A short label (``rm``, ``rater``, a function's name ...) naming the source's part in an ensemble's logs."""
    has_state: bool = False
    """Whether ``state_dict`` holds something a resumed run needs (an ensemble's running moments); only then
    is the source saved with the checkpoints and given the training loop's all-gather."""
    needs_placement: bool = False
    """Whether the source holds a torch model in ``model`` that the training loop places like its other frozen
    models (GPU, CPU offload; ``--reward_placement``)."""
    is_gold_judge: bool = False
    """Whether the scores are the simulated rater's overall score, the gold metric, so the loop reuses them
    instead of scoring the answers a second time."""
    critic_init: str | None = None
    """A reward-model dir in the policy's vocabulary that PPO's critic can start from (InstructGPT initialises
    the value model from the RM); None when the source has none."""

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        """One score per answer, (B,) float32, computed without gradients."""
        ...

    def state_dict(self) -> dict:
        """JSON-able state to save with a checkpoint (empty when ``has_state`` is False)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
