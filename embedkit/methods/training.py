"""The methods' training side, plugged into the trainer through its registries (imported by
``embedkit.train.registry.load_builtins``):

* attention schedule ``soft_mask``: the soft causal -> bidirectional transition, for any stage
  (``attention_schedule: {name: soft_mask, settings: {weight: l_over_i, tau_fraction: 0.5}}``);
* negative selector ``dynamic``: Conan's dynamic hard-negative mining in the supervised stage
  (``negative_selection: dynamic``, ``negative_settings: {floor: 0.4, ratio: 1.2, ceiling: 0.7, ...}``);
* stage ``gem``: GEM's mixed next-token-prediction + contrastive training of special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from embedkit import attention as attn
from embedkit.methods import gem
from embedkit.methods.common import add_tokens
from embedkit.methods.hard_negatives import DynamicNegatives, MinerSettings
from embedkit.methods.soft_mask import schedule_from_settings
from embedkit.train import losses
from embedkit.train.data import read_texts
from embedkit.train.recipe import StageConfig
from embedkit.train.registry import register_attention_schedule, register_negative_selector, register_stage
from embedkit.train.stages import Stage, StepResult

Unit = Annotated[float, Field(ge=0, le=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
PositiveFloat = Annotated[float, Field(gt=0)]

register_attention_schedule("soft_mask")(schedule_from_settings)


# -- dynamic hard negatives ------------------------------------------------------------------------------------

def _gather_rows(rows: Sequence[int], *tensors: torch.Tensor):
    """Every process's rows and tensors, in rank order (shards are equal-sized), so all miners agree."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows), tensors
    size = dist.get_world_size()
    row_t = torch.tensor(list(rows), dtype=torch.long)
    parts = [torch.empty_like(row_t) for _ in range(size)]
    dist.all_gather(parts, row_t)
    gathered = []
    for tensor in tensors:
        pieces = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(pieces, tensor.detach().contiguous())
        gathered.append(torch.cat(pieces))
    return torch.cat(parts).tolist(), tuple(gathered)


class DynamicSelector:
    """The supervised stage's negative selector: active negatives per row, updated from the loss's embeddings
    (the stage calls ``observe`` with them after each loss)."""

    def __init__(self, settings: MinerSettings):
        self.settings = settings
        self.miner: DynamicNegatives | None = None

    def __call__(self, stage, rows: Sequence[int]) -> list[list[str]]:
        if self.miner is None:
            k = stage.config.hard_negatives
            if k < 1:
                raise ValueError("negative_selection 'dynamic' needs hard_negatives >= 1.")
            self.miner = DynamicNegatives(stage.rows.negatives, stage.rows.positives, stage.rows.anchors, k,
                                          self.settings)
        return self.miner.select(rows)

    def observe(self, rows: Sequence[int], anchors: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor) -> None:
        rows, (anchors, positives, negatives) = _gather_rows(rows, anchors, positives, negatives)
        self.miner.observe(rows, anchors, positives, negatives)

    def stats(self) -> dict:
        return self.miner.stats() if self.miner is not None else {}


@register_negative_selector("dynamic")
def dynamic_negatives(settings: dict) -> DynamicSelector:
    return DynamicSelector(MinerSettings.from_dict(settings))


# -- GEM -------------------------------------------------------------------------------------------------------

class GEMConfig(StageConfig):
    """GEM: special tokens after the text learn to summarise it; NTP keeps generation (see methods/gem.py)."""

    objective: Literal["gem"] = "gem"
    num_special_tokens: Annotated[int, Field(ge=1)] = 1
    isolate_special_tokens: bool = True
    reconstruction_prob: Unit = Field(0.2, description="Fraction of texts in the reconstruction format; the rest "
                                                       "stay plain text for next-token prediction.")
    reconstruction_format: Literal["copy", "split"] = "copy"
    token_dropout: Fraction = Field(0.1, description="Token dropout that makes the contrastive positive.")
    contrastive_weight: Unit = Field(1.0, description="a from switch_step on: loss = (1-a) NTP + a contrastive.")
    contrastive_weight_before: Unit = 0.0
    switch_step: Annotated[int, Field(ge=0)] = 100
    scale_init: PositiveFloat = 20.0
    scale_max: PositiveFloat = 100.0
    batch_size: Annotated[int, Field(gt=0)] = 16


@register_stage("gem", config=GEMConfig)
class GEMStage(Stage):
    """Mixed NTP (plain texts and ``text <s..> copy`` reconstructions under the GEM mask) and a contrastive
    term on the special tokens' states, weighted ``(1-a) NTP + a contrastive``; the embedder then embeds with
    the special tokens (method ``gem``, saved with it)."""

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
        texts = []
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            texts += read_texts(path, self.config.data.format, self.config.data.text_field, self.config.data.limit)
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self.lead = [probe[0]] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []
        self.texts = [ids or [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    def num_rows(self) -> int:
        return len(self.texts)

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return [self.scale.value]

    def _rng(self, step: int, row: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.ctx.seed, self.ctx.index, step, int(row), stream])

    def _forward(self, rows_built, labels=None):
        emb = self.ctx.embedder
        ids, mask, segments, label_t = gem.pad_rows(rows_built, self.ctx.tokenizer.pad_token_id, labels)
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
            rng = self._rng(step, row, 0)
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
            dropped = gem.token_dropout(body, cfg.token_dropout, self._rng(step, row, 1))
            positives.append(gem.build_row(self.lead + dropped, self.special_ids))
        hidden, segments, _, tokens = self._forward(views + positives)
        states = gem.special_states(hidden, segments)
        n = len(rows)
        return gem.contrastive_loss(states[:n], states[n:], self.scale()), tokens

    def step(self, rows: Sequence[int], step: int) -> StepResult:
        cfg = self.config
        a = gem.loss_weight(step, switch_step=cfg.switch_step, weight_before=cfg.contrastive_weight_before,
                            weight_after=cfg.contrastive_weight)
        world = losses.world()[1]
        loss = torch.zeros((), device=self.ctx.embedder.device)
        tokens = 0
        if a < 1:
            ntp, n = self._ntp(rows, step)
            loss, tokens = loss + (1 - a) * ntp, tokens + n
        if a > 0:
            contrastive, n = self._contrastive(rows, step)
            loss, tokens = loss + a * contrastive, tokens + n
        (loss / world).backward()
        return StepResult(float(loss.detach()) / world, tokens)
