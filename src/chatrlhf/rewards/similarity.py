"""Semantic-similarity reward: cosine similarity of the answer to the row's reference answer.

    r_i = e(answer_i) . e(reference_i),   e(t) = mean-pooled all-MiniLM-L6-v2 token states, L2-normalised

so r_i is in [-1, 1] (1: the same meaning). The reference is ``meta["reference"]`` when the row has one,
else ``meta["chosen"]`` (a preference row's chosen answer), else the prompt text: without a reference
answer the score rewards staying on the prompt's topic, as a relevance signal.
"""

from __future__ import annotations

import torch

from chatrlhf.rewards.contract import RewardBatch, RewardSource, prompt_texts

REFERENCE_KEYS = ("reference", "chosen")
"""Metadata keys read as the reference answer, first present wins; the prompt text is the fallback."""


def reference_texts(batch: RewardBatch) -> list[str]:
    """The text each answer is compared with: ``meta["reference"]``, else ``meta["chosen"]``, else the prompt."""
    prompts = prompt_texts(batch)
    metas = batch.meta or [{} for _ in prompts]
    out = []
    for i, (prompt, meta) in enumerate(zip(prompts, metas)):
        key = next((k for k in REFERENCE_KEYS if meta.get(k) is not None), None)
        if key is None:
            out.append(prompt)
        elif isinstance(meta[key], str):
            out.append(meta[key])
        else:
            raise ValueError(f"similarity reward: row {i} of the batch has {key}={meta[key]!r} "
                             f"({type(meta[key]).__name__}); store the reference answer as a string")
    return out


class SimilaritySource(RewardSource):
    """``similarity``: MiniLM cosine of each answer to its reference (``reference_texts``); (B,) in [-1, 1].

    ``embedder``: a ``chatrlhf.models.encoder.MiniLMEmbedder`` (in eval mode); default: the packaged
    all-MiniLM-L6-v2, loaded on first use.
    """

    name = short_name = "similarity"

    def __init__(self, embedder=None, batch_size: int = 64):
        self._embedder = embedder
        self.batch_size = batch_size

    @property
    def embedder(self):
        if self._embedder is None:
            from chatrlhf.models.encoder import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        refs = reference_texts(batch)
        # Each distinct text is embedded once: the samples of one prompt share its reference.
        distinct = list(dict.fromkeys([*batch.responses, *refs]))
        row = {text: i for i, text in enumerate(distinct)}
        self.embedder.model.eval()  # dropout off: a reward must not be random
        emb = self.embedder.embed(distinct, self.batch_size)  # (U, D), unit norm
        answers = emb[[row[t] for t in batch.responses]]  # (B, D)
        references = emb[[row[t] for t in refs]]  # (B, D)
        return (answers * references).sum(-1).float()  # (B,)
