"""Training stages: MNTP, unsupervised SimCSE, supervised contrastive. Each is registered by objective name.

A stage reads and checks its data (before the model loads), tokenizes it (after), and runs one optimisation
step's forward and backward on this process's rows (``step``); the trainer owns the order, the optimiser,
gradient sync, checkpoints and logging. Random choices (MNTP masks) derive from (seed, stage, step, row), so
runs replay exactly after a resume and give the same global batch on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.batching import Tokenized, tokenize
from embedkit.train import losses
from embedkit.train.data import DataError, PairRows, pack_blocks, read_pairs, read_texts, resolve_path
from embedkit.train.recipe import MNTPConfig, SimCSEConfig, StageConfig, SupervisedConfig
from embedkit.train.registry import NEGATIVE_SELECTORS, register_negative_selector, register_stage


@dataclass
class StageContext:
    """What the trainer hands a stage."""

    embedder: object  # embedkit.Embedder; its backbone is the peft-wrapped model during the stage
    tokenizer: object
    index: int
    seed: int
    data_dir: Path | None
    recipe_dir: Path | None
    max_length: int
    causal_lm: nn.Module | None = None  # the model with its LM head (MNTP), sharing the backbone's weights
    extras: dict = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float  # this process's share (sum over processes = the global batch loss)
    tokens: int  # real (non-padding) tokens this process ran through the model


class Stage:
    """Base class. Subclasses set ``needs_lm_head`` and implement ``check_data``, ``prepare`` and ``step``."""

    objective = "?"
    needs_lm_head = False

    def __init__(self, config: StageConfig, ctx: StageContext):
        self.config, self.ctx = config, ctx

    @classmethod
    def data_paths(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> list[Path]:
        return [resolve_path(p, data_dir, recipe_dir) for p in config.data.paths]

    @classmethod
    def check_data(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> int:
        """Read the stage's files and return the row count; raise DataError naming file and line."""
        raise NotImplementedError

    @classmethod
    def count_texts(cls, config: StageConfig, data_dir: Path | None, recipe_dir: Path | None) -> int:
        """``check_data`` for stages that read plain texts: every file read, the texts counted."""
        return sum(len(read_texts(p, config.data.format, config.data.text_field, config.data.limit))
                   for p in cls.data_paths(config, data_dir, recipe_dir))

    def setup_model(self) -> None:
        """Before the LoRA adapter is added (e.g. resize embeddings for a new mask token)."""

    def prepare(self) -> None:
        """Tokenize (the model is loaded)."""

    def num_rows(self) -> int:
        raise NotImplementedError

    def groups(self) -> list[str] | None:
        """Per-row group names when batches must come from one group (same-source batches)."""
        return None

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters besides the LoRA adapter that this stage trains."""
        return []

    @contextlib.contextmanager
    def active(self):
        """Settings in force while the stage trains (dropout); restored afterwards."""
        yield

    def step(self, rows: Sequence[int], step: int) -> StepResult:
        raise NotImplementedError

    def report(self) -> dict:
        """Figures the stage gathered while training (e.g. negatives replaced by mining), logged at its end."""
        return {}


# -- helpers -------------------------------------------------------------------------------------------------

def _all_reduce_sum(value: float) -> float:
    rank, size = losses.world()
    if size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


@contextlib.contextmanager
def dropout_settings(model: nn.Module, attention: float, hidden: float):
    """Attention-probability dropout (the attention modules' ``attention_dropout``) and hidden dropout on
    each attention and MLP sublayer output (BERT's placement; Llama-style models have none of their own)."""
    saved = []
    for module in model.modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and not isinstance(module, nn.Dropout):
            saved.append((module, value))
            module.attention_dropout = attention
    handles = []
    if hidden > 0:
        def hook(module, args, output):
            if not module.training:
                return output
            if isinstance(output, tuple):
                return (F.dropout(output[0], hidden, True),) + tuple(output[1:])
            return F.dropout(output, hidden, True)

        for name, module in model.named_modules():
            if name.endswith((".mlp", ".self_attn")):
                handles.append(module.register_forward_hook(hook))
        if not handles:
            raise ValueError("hidden_dropout: found no '.mlp' / '.self_attn' sublayers in this model to drop out "
                             "from; set hidden_dropout: 0.")
    try:
        yield
    finally:
        for module, value in saved:
            module.attention_dropout = value
        for handle in handles:
            handle.remove()


def _row_rng(seed: int, stage: int, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step, row])


# -- MNTP ----------------------------------------------------------------------------------------------------

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


@register_stage("mntp", config=MNTPConfig)
class MNTPStage(Stage):
    """Masked next-token prediction: the token masked at position i is predicted from the output at i-1,
    through the model's own (frozen unless ``train_lm_head``) LM head."""

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
        texts = []
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            texts += read_texts(path, self.config.data.format, self.config.data.text_field, self.config.data.limit)
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

    def step(self, rows: Sequence[int], step: int) -> StepResult:
        inputs, labels = [], []
        for row in rows:
            rng = _row_rng(self.ctx.seed, self.ctx.index, step, int(row))
            x, y = mask_block(self.blocks[row], rng, ratio=self.config.mask_ratio,
                              strategy=self.config.mask_strategy, mask_id=self.mask_id, vocab=self.vocab,
                              special=self.special)
            inputs.append(x)
            labels.append(y)
        device = self.ctx.embedder.device
        input_ids = torch.as_tensor(np.stack(inputs), device=device)
        label_t = torch.as_tensor(np.stack(labels), device=device)
        attention = torch.ones_like(input_ids)
        hidden = self.ctx.embedder.hidden_states(input_ids, attention)
        target = label_t[:, 1:]
        where = target != -100
        picked = hidden[:, :-1][where]  # output at i-1 predicts the token at i
        logits = self.ctx.causal_lm.get_output_embeddings()(picked).float()
        count = int(where.sum())
        total = _all_reduce_sum(float(count))
        loss = F.cross_entropy(logits, target[where], reduction="sum") / max(total, 1.0)
        loss.backward()
        return StepResult(float(loss.detach()), int(input_ids.numel()))


NEW_MASK_TOKEN = "<|mntp_mask|>"


# -- contrastive ---------------------------------------------------------------------------------------------

class ContrastiveStage(Stage):
    """Shared by SimCSE and supervised: tokenization with the embedder's template and GradCache towers."""

    def _tokenize(self, texts: Sequence[str], instruction: str | None = None) -> Tokenized:
        emb = self.ctx.embedder
        return tokenize(self.ctx.tokenizer, texts, max_length=self.ctx.max_length, instruction=instruction,
                        template=emb.config.template, append_eos=emb.config.pooling == "eos")

    def _embed_fn(self, tokenized: Tokenized, rows: Sequence[int]):
        emb = self.ctx.embedder

        def embed(chunk: Sequence[int]) -> torch.Tensor:
            return emb(*emb.collate(tokenized, [rows[i] for i in chunk]))
        return embed

    @staticmethod
    def _count(tokenized: Tokenized, rows: Sequence[int]) -> int:
        return sum(len(tokenized.ids[r]) for r in rows)

    @contextlib.contextmanager
    def active(self):
        with dropout_settings(self.ctx.embedder.backbone, self.config.attention_dropout, self.config.hidden_dropout):
            yield

    def extra_parameters(self) -> list[nn.Parameter]:
        """A trainable pooler (NV-Embed latent attention) trains with the contrastive stages."""
        pooler = self.ctx.embedder.pooler
        return [p.requires_grad_(True) for p in pooler.parameters()] if pooler is not None else []


@register_stage("simcse", config=SimCSEConfig)
class SimCSEStage(ContrastiveStage):
    """Unsupervised SimCSE: a sentence and itself under two dropout masks are the positive pair."""

    config: SimCSEConfig

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return cls.count_texts(config, data_dir, recipe_dir)

    def prepare(self) -> None:
        texts = []
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            texts += read_texts(path, self.config.data.format, self.config.data.text_field, self.config.data.limit)
        self.tokenized = self._tokenize(texts)

    def num_rows(self) -> int:
        return len(self.tokenized)

    def step(self, rows: Sequence[int], step: int) -> StepResult:
        rows = list(rows)
        embed = self._embed_fn(self.tokenized, rows)
        cfg = self.config
        loss = losses.run_towers(
            [(embed, len(rows)), (embed, len(rows))],
            lambda a, b: losses.contrastive_loss(a, b, None, cfg.temperature, cfg.gather_across_processes),
            cfg.mini_batch_size)
        return StepResult(loss, 2 * self._count(self.tokenized, rows))


@register_negative_selector("from_data")
def negatives_from_data(settings: dict):
    """The default: the row's own hard negatives from the data file (the first ``hard_negatives`` fields)."""
    if settings:
        raise ValueError(f"negative_selection 'from_data' takes no settings, got {sorted(settings)}.")

    def select(stage: SupervisedStage, rows: Sequence[int]) -> list[list[str]]:
        k = stage.config.hard_negatives
        return [stage.rows.negatives[r][:k] for r in rows]
    return select


@register_stage("supervised", config=SupervisedConfig)
class SupervisedStage(ContrastiveStage):
    """Supervised contrastive (LLM2Vec / E5 style): anchor vs its positive, the other rows' positives and all
    hard negatives of the (global) batch. Negative choice is the registered ``negative_selection``."""

    config: SupervisedConfig
    rows: PairRows

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return sum(len(read_pairs(p, config.data, config.hard_negatives))
                   for p in cls.data_paths(config, data_dir, recipe_dir))

    def prepare(self) -> None:
        self.rows = PairRows()
        for path in self.data_paths(self.config, self.ctx.data_dir, self.ctx.recipe_dir):
            part = read_pairs(path, self.config.data, self.config.hard_negatives)
            for name in ("anchors", "positives", "negatives", "sources", "instructions"):
                getattr(self.rows, name).extend(getattr(part, name))
        self.select_negatives = NEGATIVE_SELECTORS[self.config.negative_selection](self.config.negative_settings)
        self.anchors = self._tokenize_anchors()
        self.positives = self._tokenize(self.rows.positives)

    def _tokenize_anchors(self) -> Tokenized:
        """Anchors carry the stage instruction, or the row's own; instruction tokens are attended, not pooled."""
        out = Tokenized([[] for _ in range(len(self.rows))], [0] * len(self.rows))
        by_instruction: dict[str | None, list[int]] = {}
        for i, own in enumerate(self.rows.instructions):
            by_instruction.setdefault(own if own is not None else self.config.instruction, []).append(i)
        for instruction, idx in by_instruction.items():
            part = self._tokenize([self.rows.anchors[i] for i in idx], instruction)
            for j, i in enumerate(idx):
                out.ids[i], out.prefix_lengths[i] = part.ids[j], part.prefix_lengths[j]
            out.n_truncated += part.n_truncated
        return out

    def num_rows(self) -> int:
        return len(self.rows)

    def groups(self) -> list[str] | None:
        return self.rows.sources if self.config.same_source_batches else None

    def step(self, rows: Sequence[int], step: int) -> StepResult:
        rows = list(rows)
        cfg = self.config
        negatives = self.select_negatives(self, rows)
        if any(len(n) != cfg.hard_negatives for n in negatives):
            raise ValueError(f"negative selector {cfg.negative_selection!r} must give {cfg.hard_negatives} "
                             "negatives per row.")
        towers = [(self._embed_fn(self.anchors, rows), len(rows)), (self._embed_fn(self.positives, rows), len(rows))]
        tokens = self._count(self.anchors, rows) + self._count(self.positives, rows)
        flat = [text for row in negatives for text in row]
        if flat:
            neg_tok = self._tokenize(flat)
            towers.append((self._embed_fn(neg_tok, list(range(len(flat)))), len(flat)))
            tokens += self._count(neg_tok, range(len(flat)))

        def loss_fn(a, p, n=None):
            observe = getattr(self.select_negatives, "observe", None)  # e.g. dynamic mining reads the scores
            if observe is not None and n is not None:
                observe(rows, a.detach(), p.detach(), n.detach())
            return losses.contrastive_loss(a, p, n, cfg.temperature, cfg.gather_across_processes)
        loss = losses.run_towers(towers, loss_fn, cfg.mini_batch_size)
        return StepResult(loss, tokens)

    def report(self) -> dict:
        stats = getattr(self.select_negatives, "stats", None)
        return stats() if callable(stats) else {}
