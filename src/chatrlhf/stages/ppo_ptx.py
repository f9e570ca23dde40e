"""PPO-ptx (Ouyang et al. 2022, eq. 2): the language-model loss on SFT or pretraining text that
``stages/ppo.py`` adds to the actor's loss with weight ``ptx_coef``."""

from __future__ import annotations

import torch

from chatrlhf.config import DataConfig
from chatrlhf.data import SFTCollator, encode_records, prepare_records
from chatrlhf.engine import Engine
from chatrlhf.stages.ppo_config import PPOConfig
from chatrlhf.stages.sft import forward_nll


class PtxData:
    """The ptx text, drawn per actor micro-batch.

    Each actor micro-batch draws ``micro_batch_size`` examples from a generator seeded by (iteration,
    update, micro-batch, rank), so a resumed run draws the same ones; the term is that micro-batch's
    token-mean NLL divided by the mini-batch's number of micro-batches (the mean of micro-batch means).
    """

    def __init__(self, cfg: PPOConfig, tokenizer, rank: int, world: int):
        data = DataConfig(datasets=cfg.ptx_data, data_split="1,0,0", eval_fraction=0.0, seed=cfg.data.seed,
                          max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                          long_prompt=cfg.data.long_prompt, bad_rows=cfg.data.bad_rows)
        records, _ = prepare_records(data, kind="sft", phase=1)
        self.items = encode_records(records, "sft", tokenizer, data, progress=False)
        self.collate = SFTCollator(pad_id=tokenizer.pad_token_id)
        self.micro = cfg.actor_engine.micro_batch_size
        self.seed, self.rank = cfg.actor_engine.seed, rank

    def loss(self, actor: Engine, key: tuple[int, int, int, int]) -> torch.Tensor:
        """The ptx loss of the micro-batch ``key`` = (iteration, update, micro-batch, micro-batches in the
        mini-batch) names."""
        iteration, update, micro_index, per_mini = key
        gen = torch.Generator().manual_seed(hash((self.seed, iteration, update, micro_index, self.rank)) % 2**62)
        idx = torch.randint(len(self.items), (self.micro,), generator=gen).tolist()
        nll, labelled = forward_nll(actor, self.collate([self.items[i] for i in idx]), actor.cfg.packing)
        return nll.sum() / labelled.sum().clamp(min=1) / per_mini
