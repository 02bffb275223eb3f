"""GEM: special tokens after the text learn to summarise it (a contrastive term on their states), while
next-token prediction on plain texts and ``text <s..> copy`` reconstructions keeps generation; the embedder
then embeds with the special tokens (method ``gem``, saved with it). The mechanism is ``embedkit.methods.gem``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from embedkit import attention as attn
from embedkit.backbone import padding_id
from embedkit.methods import gem
from embedkit.methods.common import add_tokens
from embedkit.train.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, StageConfig, Unit
from embedkit.train.losses import Loss, info_nce
from embedkit.train.objectives.base import Objective, register_objective, row_rng


class GEMConfig(StageConfig):
    """GEM: special tokens after the text learn to summarise it; NTP keeps generation (see methods/gem.py)."""

    objective: Literal["gem"] = "gem"
    num_special_tokens: PositiveInt = 1
    isolate_special_tokens: bool = True
    reconstruction_prob: Unit = Field(0.2, description="Fraction of texts in the reconstruction format; the rest "
                                                       "stay plain text for next-token prediction.")
    reconstruction_format: Literal["copy", "split"] = "copy"
    token_dropout: Fraction = Field(0.1, description="Token dropout that makes the contrastive positive.")
    contrastive_weight: Unit = Field(1.0, description="a from switch_step on: loss = (1-a) NTP + a contrastive.")
    contrastive_weight_before: Unit = 0.0
    switch_step: NonNegativeInt = 100
    scale_init: PositiveFloat = 20.0
    scale_max: PositiveFloat = 100.0
    batch_size: PositiveInt = 16


@register_objective("gem", config=GEMConfig)
class GEM(Objective):
    """Mixed NTP (plain texts and reconstructions under the GEM mask) and a contrastive term on the special
    tokens' states, weighted ``(1-a) NTP + a contrastive``: a mean over this process's rows."""

    needs_lm_head = True
    config: GEMConfig

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return cls.count_texts(config, data_dir, recipe_dir)

    def setup_model(self) -> None:
        cfg = self.config
        self.special_ids, _ = add_tokens(self.ctx.tokenizer, self.ctx.causal_lm, gem.special_tokens(
            cfg.num_special_tokens), init="mean", special=True)
        gem.enable_gem(self.ctx.embedder, cfg.num_special_tokens, cfg.isolate_special_tokens)
        self.scale = gem.LearnableScale(cfg.scale_init, cfg.scale_max).to(self.ctx.embedder.device)

    def prepare(self) -> None:
        tok = self.ctx.tokenizer
        texts = self.read_all_texts(self.config, self.ctx.data_dir, self.ctx.recipe_dir)
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self.lead = [probe[0]] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []
        self.texts = [ids or [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    def num_rows(self) -> int:
        return len(self.texts)

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return [self.scale.value]

    def _forward(self, rows_built, labels=None):
        emb = self.ctx.embedder
        ids, mask, segments, label_t = gem.pad_rows(rows_built, padding_id(self.ctx.tokenizer, emb.backbone), labels)
        ids, mask, segments, label_t = (t.to(emb.device) for t in (ids, mask, segments, label_t))
        # always the GEM mask (causal for plain rows), whatever attention mode the recipe gives the model
        bias = gem.gem_bias(segments, isolate_special_tokens=self.config.isolate_special_tokens)
        model = emb.backbone
        hidden = model(**attn.model_inputs(model, ids, mask, bias), use_cache=False).last_hidden_state
        return hidden, segments, label_t, int(mask.sum())

    def _ntp(self, rows: Sequence[int], step: int) -> tuple[torch.Tensor, int]:
        cfg, k = self.config, self.config.num_special_tokens
        budget = self.ctx.max_length - len(self.lead)
        built, labels = [], []
        for row in rows:
            rng = row_rng(self.ctx.seed, self.ctx.index, step, int(row), 0)
            body = self.texts[row]
            if rng.random() < cfg.reconstruction_prob:
                body = body[: max(1, (budget - k) // 2)]
                built.append(gem.reconstruction_row(body, self.special_ids, rng, cfg.reconstruction_format,
                                                    self.lead))
            else:
                built.append(gem.build_row(self.lead + body[:budget], []))
            labels.append(gem.ntp_labels(*built[-1]))
        hidden, _, label_t, tokens = self._forward(built, labels)
        where = label_t != -100
        logits = self.ctx.causal_lm.get_output_embeddings()(hidden[where]).float()
        return F.cross_entropy(logits, label_t[where]), tokens

    def _contrastive(self, rows: Sequence[int], step: int) -> tuple[torch.Tensor, int]:
        cfg = self.config
        budget = self.ctx.max_length - len(self.lead) - cfg.num_special_tokens
        views, positives = [], []
        for row in rows:
            body = self.texts[row][:budget]
            views.append(gem.build_row(self.lead + body, self.special_ids))
            dropped = gem.token_dropout(body, cfg.token_dropout, row_rng(self.ctx.seed, self.ctx.index, step,
                                                                         int(row), 1))
            positives.append(gem.build_row(self.lead + dropped, self.special_ids))
        hidden, segments, _, tokens = self._forward(views + positives)
        states = gem.special_states(hidden, segments)
        n = len(rows)
        return info_nce(states[:n], states[n:], scale=self.scale(), gather=False) / n, tokens

    def loss(self, rows: Sequence[int], step: int) -> Loss:
        cfg = self.config
        a = gem.loss_weight(step, switch_step=cfg.switch_step, weight_before=cfg.contrastive_weight_before,
                            weight_after=cfg.contrastive_weight)
        loss = torch.zeros((), device=self.ctx.embedder.device)
        tokens = 0
        if a < 1:
            ntp, n = self._ntp(rows, step)
            loss, tokens = loss + (1 - a) * ntp, tokens + n
        if a > 0:
            contrastive, n = self._contrastive(rows, step)
            loss, tokens = loss + a * contrastive, tokens + n
        return Loss(loss, 1.0, tokens)  # a mean over this process's rows: one unit per process
