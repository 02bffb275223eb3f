"""GEM (Generative Embedding large language Model, Zhang et al. 2025): special tokens after the text learn to
summarise it, while the model keeps generating.

* Token insertion: new tokens ``<|gem_1|> .. <|gem_k|>`` go after the text: ``text <s1>..<sk>``.
* Mask: causal; the special tokens see the text (and, with ``isolate_special_tokens``, not each other, as in
  the paper). In the reconstruction format ``text <s..> copy`` the copy's tokens see only the special tokens
  and the copy before them, never the original text, so everything the copy needs flows through the specials.
  (The paper's general form is ``prefix <s..> suffix`` with the split at a random point; ``split`` does that.)
* Losses: next-token prediction on plain texts (a fraction ``1 - reconstruction_prob`` of the texts stay
  plain so generation is kept) and on the reconstructions; a contrastive term on the special tokens' final
  states (positive: the same text with random token dropout; in-batch negatives) with a learnable scale that
  starts at 20 and is capped at 100. Total ``(1 - a) * NTP + a * contrastive``, ``a`` switching from
  ``weight_before`` to ``weight_after`` at ``switch_step``.
* Embedding: the special tokens' final hidden state (mean if k > 1).

This module holds the mechanism as functions (tested on their own) and the ``gem`` embedder method that
installs the embedding hook, so a GEM-trained embedder saves and loads; the training stage uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from embedkit import attention as attn
from embedkit.backbone import padding_id
from embedkit.io import StrictConfig
from embedkit.method_registry import enable_method, register_method
from embedkit.methods.common import add_tokens, last_index

NAME = "gem"
PREFIX, SPECIAL, SUFFIX = 0, 1, 2  # segment ids
PAD_SEGMENT = -1


def special_tokens(k: int) -> list[str]:
    return [f"<|gem_{i + 1}|>" for i in range(k)]


# -- sequences and masks -----------------------------------------------------------------------------------

def build_row(text_ids: Sequence[int], special_ids: Sequence[int], suffix_ids: Sequence[int] | None = None
              ) -> tuple[list[int], list[int]]:
    """``text <s..> [suffix]`` as (token ids, segment ids)."""
    suffix_ids = list(suffix_ids or [])
    ids = list(text_ids) + list(special_ids) + suffix_ids
    segments = [PREFIX] * len(text_ids) + [SPECIAL] * len(special_ids) + [SUFFIX] * len(suffix_ids)
    return ids, segments


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, labels: Sequence[list[int]] | None = None):
    """Right-pad (ids, segments[, labels]) rows into tensors: ids, attention mask, segments (-1 = pad), labels."""
    width = max(len(ids) for ids, _ in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), PAD_SEGMENT, dtype=torch.long)
    label_t = torch.full((n, width), -100, dtype=torch.long)
    for r, (row_ids, row_segments) in enumerate(rows):
        ids[r, :len(row_ids)] = torch.tensor(row_ids)
        mask[r, :len(row_ids)] = 1
        segments[r, :len(row_ids)] = torch.tensor(row_segments)
        if labels is not None:
            label_t[r, :len(row_ids)] = torch.tensor(labels[r])
    return ids, mask, segments, label_t


def gem_allowed(segments: torch.Tensor, attention_mask: torch.Tensor, *, isolate_special_tokens: bool = True
                ) -> torch.Tensor:
    """Boolean (B, L, L) "query i may attend to key j": causal, real keys only; suffix queries never see prefix
    keys; with ``isolate_special_tokens`` a special token sees no other special token. Padding queries keep
    their own position (no fully blocked row)."""
    length = segments.shape[1]
    real = attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & real[:, None, :]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed &= ~((query == SUFFIX) & (key == PREFIX))
    if isolate_special_tokens:
        eye = torch.eye(length, dtype=torch.bool, device=segments.device)
        allowed &= ~((query == SPECIAL) & (key == SPECIAL) & ~eye)
    return allowed | torch.eye(length, dtype=torch.bool, device=segments.device)


def gem_bias(segments: torch.Tensor, *, isolate_special_tokens: bool = True) -> attn.AttentionBias:
    """An attention bias (for ``attention.model_inputs``) that applies the GEM mask of these segments."""
    def bias(input_ids, attention_mask, base):
        allowed = gem_allowed(segments, attention_mask, isolate_special_tokens=isolate_special_tokens)
        mask = torch.zeros(allowed.shape, dtype=base.dtype, device=base.device)
        return mask.masked_fill(~allowed, torch.finfo(base.dtype).min).unsqueeze(1)
    return bias


def ntp_labels(ids: Sequence[int], segments: Sequence[int]) -> list[int]:
    """Per position, the token it must predict next (-100: none): every next token that is not a special
    token; the last special token predicts the first suffix token (the reconstruction's bottleneck)."""
    labels = [-100] * len(ids)
    for i in range(len(ids) - 1):
        if segments[i + 1] != SPECIAL:
            labels[i] = ids[i + 1]
    return labels


def token_dropout(ids: Sequence[int], p: float, rng: np.random.Generator) -> list[int]:
    """Drop each token with probability ``p`` (at least one token stays): GEM's positive view of a text."""
    ids = list(ids)
    keep = rng.random(len(ids)) >= p
    if not keep.any():
        keep[rng.integers(len(ids))] = True
    return [t for t, k in zip(ids, keep, strict=True) if k]


def reconstruction_row(text_ids: Sequence[int], special_ids: Sequence[int], rng: np.random.Generator,
                       fmt: str = "copy", lead: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """``copy``: ``lead text <s..> text``; ``split``: ``lead prefix <s..> suffix`` at a random split (the
    paper's form). ``lead`` (a BOS token) starts the row and is not copied."""
    text_ids, lead = list(text_ids), list(lead)
    if fmt == "copy" or (fmt == "split" and len(text_ids) < 2):
        return build_row(lead + text_ids, special_ids, text_ids)
    if fmt == "split":
        cut = int(rng.integers(1, len(text_ids)))
        return build_row(lead + text_ids[:cut], special_ids, text_ids[cut:])
    raise ValueError(f"Unknown GEM reconstruction format {fmt!r}; valid: copy, split.")


# -- losses --------------------------------------------------------------------------------------------------

class LearnableScale(nn.Module):
    """The contrastive logit scale: a parameter starting at ``init`` (20), clamped to ``[1e-2, max]`` (100)."""

    def __init__(self, init: float = 20.0, maximum: float = 100.0):
        super().__init__()
        if not 0 < init <= maximum:
            raise ValueError(f"scale must start in (0, {maximum}], got {init}.")
        self.maximum = maximum
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> torch.Tensor:
        return self.value.clamp(min=1e-2, max=self.maximum)


def contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In-batch InfoNCE on cosine similarity times ``scale``: row i's positive is positives[i]."""
    q = F.normalize(queries.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    logits = scale * (q @ p.T)
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def loss_weight(step: int, *, switch_step: int = 100, weight_before: float = 0.0, weight_after: float = 1.0) -> float:
    """The contrastive weight ``a`` at ``step`` (0-based): ``weight_before`` until ``switch_step``, then after."""
    return weight_before if step < switch_step else weight_after


def special_states(hidden: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Mean final state of each row's special tokens (the GEM embedding), (B, H)."""
    weights = (segments == SPECIAL).to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


# -- the embedder method -------------------------------------------------------------------------------------

class GEMSettings(StrictConfig):
    """What ``embedkit.json`` stores under ``methods.gem``."""

    label = "gem settings"

    num_special_tokens: int = 1
    isolate_special_tokens: bool = True

    @field_validator("num_special_tokens")
    @classmethod
    def _count(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"num_special_tokens must be >= 1, got {value}.")
        return value


class GEMHook:
    """``embedder.forward_hook``: append the special tokens after each text, run under the GEM mask, and return
    the states with the last real position holding the special tokens' mean (pool with ``last``)."""

    def __init__(self, settings: GEMSettings, special_ids: list[int]):
        self.settings = settings
        self.special_ids = special_ids

    def __call__(self, embedder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = []
        real = attention_mask.bool()
        for r in range(input_ids.shape[0]):
            rows.append(build_row(input_ids[r][real[r]].tolist(), self.special_ids))
        ids, mask, segments, _ = pad_rows(rows, padding_id(embedder.tokenizer, embedder.backbone))
        ids, mask, segments = (t.to(input_ids.device) for t in (ids, mask, segments))
        bias = gem_bias(segments, isolate_special_tokens=self.settings.isolate_special_tokens)
        model = embedder.backbone
        hidden = model(**attn.model_inputs(model, ids, mask, bias), use_cache=False).last_hidden_state
        pooled = special_states(hidden, segments)
        # each row's i-th real token sits at column i of the new (right-padded) batch: move it back
        column = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        gathered = hidden.gather(1, column.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        out = gathered.masked_fill(~real.unsqueeze(-1), 0.0)
        batch = torch.arange(input_ids.shape[0], device=hidden.device)
        return out.index_put((batch, last_index(attention_mask)), pooled)


@register_method(NAME)
def apply(embedder, settings: dict) -> dict:
    parsed = GEMSettings.from_dict(settings)
    if embedder.config.pooling != "last":
        raise ValueError(f"GEM embeds with its special tokens (pooling='last'); got {embedder.config.pooling!r}.")
    ids, _ = add_tokens(embedder.tokenizer, embedder.backbone, special_tokens(parsed.num_special_tokens),
                        init="mean", special=True)
    embedder.forward_hook = GEMHook(parsed, ids)
    return parsed.to_dict()


def enable_gem(embedder, num_special_tokens: int = 1, isolate_special_tokens: bool = True) -> None:
    """Embed with GEM's special tokens (added if missing) and record the setting for save / load."""
    embedder.config.pooling = "last"
    enable_method(embedder, NAME, {"num_special_tokens": num_special_tokens,
                            "isolate_special_tokens": isolate_special_tokens})


# -- generation check ----------------------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(causal_lm: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 128,
               batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over every predicted token of ``texts`` (each text on its own, as tokenized
    with the tokenizer's special tokens, truncated to ``max_length``)."""
    was_training = causal_lm.training
    causal_lm.eval()
    total, count = 0.0, 0
    device = next(causal_lm.parameters()).device
    try:
        encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start:start + batch_size]]
            ids, mask, _, _ = pad_rows([(c, [PREFIX] * len(c)) for c in chunk], padding_id(tokenizer, causal_lm))
            ids, mask = ids.to(device), mask.to(device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = causal_lm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    finally:
        causal_lm.train(was_training)
    return math.exp(total / max(count, 1))
