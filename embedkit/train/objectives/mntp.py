"""Masked next-token prediction (LLM2Vec): the token masked at position i is predicted from the output at
i-1, through the model's own LM head (frozen unless ``train_lm_head``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from embedkit.train.config import PositiveInt, StageConfig
from embedkit.train.data import DataError, pack_blocks
from embedkit.train.losses import Loss
from embedkit.train.objectives.base import Objective, register_objective, row_rng

NEW_MASK_TOKEN = "<|mntp_mask|>"


class MNTPConfig(StageConfig):
    """Masked next-token prediction (LLM2Vec): predict masked token i from the output at i-1."""

    objective: Literal["mntp"] = "mntp"
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.2
    mask_strategy: Literal["bert", "all_mask"] = "bert"
    mask_token: Literal["auto", "model", "underscore", "new"] = "auto"
    train_lm_head: bool = False
    batch_size: PositiveInt = 32


def mask_block(ids: np.ndarray, rng: np.random.Generator, *, ratio: float, strategy: str, mask_id: int,
               vocab: int, special: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``ratio`` of the maskable positions (not position 0, not special tokens) of one block.

    ``bert``: 80 % become the mask token, 10 % a random token, 10 % stay; ``all_mask``: all become the mask.
    Returns (input ids, labels with -100 where not masked).
    """
    ids = ids.copy()
    labels = np.full_like(ids, -100)
    maskable = np.array([i > 0 and int(t) not in special for i, t in enumerate(ids)])
    chosen = (rng.random(len(ids)) < ratio) & maskable
    if not chosen.any() and maskable.any():  # every block teaches something
        chosen[rng.choice(np.flatnonzero(maskable))] = True
    labels[chosen] = ids[chosen]
    if strategy == "all_mask":
        ids[chosen] = mask_id
        return ids, labels
    roll = rng.random(len(ids))
    ids[chosen & (roll < 0.8)] = mask_id
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[random_pos] = rng.integers(0, vocab, size=int(random_pos.sum()))
    return ids, labels


@register_objective("mntp", config=MNTPConfig)
class MNTP(Objective):
    """Text packed into ``max_length`` blocks, masked per row and step; the loss sums over masked tokens."""

    needs_lm_head = True
    config: MNTPConfig

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return cls.count_texts(config, data_dir, recipe_dir)

    def _mask_token_id(self) -> int:
        tok = self.ctx.tokenizer
        choice = self.config.mask_token
        if choice == "auto":
            choice = "model" if tok.mask_token_id is not None else "underscore"
        if choice == "model":
            if tok.mask_token_id is None:
                raise ValueError("mask_token: model, but this tokenizer has no mask token; use underscore "
                                 "(LLM2Vec's choice) or new.")
            return int(tok.mask_token_id)
        if choice == "underscore":
            token_id = tok.convert_tokens_to_ids("_")  # LLM2Vec: tokenizer.mask_token = "_"
            if token_id is None or token_id == tok.unk_token_id:
                raise ValueError("'_' is not a token of this tokenizer; use mask_token: new.")
            return int(token_id)
        return int(tok.convert_tokens_to_ids(NEW_MASK_TOKEN))

    def setup_model(self) -> None:
        if self.config.mask_token == "new":
            tok = self.ctx.tokenizer
            if NEW_MASK_TOKEN not in tok.get_vocab():
                tok.add_special_tokens({"additional_special_tokens": [NEW_MASK_TOKEN]})
                self.ctx.causal_lm.resize_token_embeddings(len(tok))

    def prepare(self) -> None:
        tok = self.ctx.tokenizer
        texts = self.read_all_texts(self.config, self.ctx.data_dir, self.ctx.recipe_dir)
        ids = tok(texts, add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id if ids and ids[0] and ids[0][0] == tok.bos_token_id else None
        self.blocks = pack_blocks(ids, self.ctx.max_length, tok.eos_token_id, bos)
        if len(self.blocks) == 0:
            raise DataError(f"MNTP data ({', '.join(self.config.data.paths)}) has fewer tokens than one block of "
                            f"{self.ctx.max_length}; give more text or lower max_length.")
        self.mask_id = self._mask_token_id()
        self.special = set(tok.all_special_ids) - {self.mask_id}
        self.vocab = self.ctx.causal_lm.get_output_embeddings().weight.shape[0]

    def num_rows(self) -> int:
        return len(self.blocks)

    def extra_parameters(self) -> list[nn.Parameter]:
        if not self.config.train_lm_head:
            return []
        head = self.ctx.causal_lm.get_output_embeddings()
        head.weight.requires_grad_(True)
        return [head.weight]

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        inputs, labels = [], []
        for row in rows:
            x, y = mask_block(self.blocks[row], row_rng(self.ctx.seed, self.ctx.index, step, int(row)),
                              ratio=self.config.mask_ratio, strategy=self.config.mask_strategy, mask_id=self.mask_id,
                              vocab=self.vocab, special=self.special)
            inputs.append(x)
            labels.append(y)
        device = self.ctx.embedder.device
        input_ids = torch.as_tensor(np.stack(inputs), device=device)
        label_t = torch.as_tensor(np.stack(labels), device=device)
        hidden = self.ctx.embedder.hidden_states(input_ids, torch.ones_like(input_ids))
        target = label_t[:, 1:]
        where = target != -100
        picked = hidden[:, :-1][where]  # output at i-1 predicts the token at i
        logits = self.ctx.causal_lm.get_output_embeddings()(picked).float()
        total = F.cross_entropy(logits, target[where], reduction="sum")
        return Loss(total, float(where.sum()), int(input_ids.numel()))
