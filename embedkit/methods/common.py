"""Helpers the methods share: locate tokens per row, add new tokens (the decoder layers: ``backbone``)."""

from __future__ import annotations

import torch
from torch import nn


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (left or right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def first_match(input_ids: torch.Tensor, token_id: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the first occurrence of ``token_id`` per row; -1 where a row lacks it."""
    hits = input_ids == token_id
    if attention_mask is not None:
        hits &= attention_mask.bool()
    index = hits.to(torch.int32).argmax(dim=1)
    return torch.where(hits.any(dim=1), index, torch.full_like(index, -1)).long()


def add_tokens(tokenizer, model: nn.Module, tokens: list[str], *, init: str = "mean", seed: int = 0,
               special: bool = True) -> tuple[list[int], bool]:
    """Add ``tokens`` to the tokenizer (if missing) and make the input embeddings cover them.

    Rows of tokens that were just added are initialised (``mean`` of the existing rows, or ``random``:
    a seeded normal draw with the existing rows' per-dimension spread); rows of tokens the tokenizer already
    had (a saved model being reloaded) are kept as they are. Returns (token ids, whether anything was added).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:  # add_tokens(special_tokens=True): never split, skipped when decoding; works in transformers 4 and 5
        tokenizer.add_tokens(missing, special_tokens=special)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if max(ids) >= old_rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        embeddings = model.get_input_embeddings()
    fresh = [i for t, i in zip(tokens, ids, strict=True) if t in missing or i >= old_rows]
    if fresh:
        weight = embeddings.weight
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[fresh] = False
        keep[old_rows:] = False
        reference = weight.detach()[keep].float()
        with torch.no_grad():
            if init == "mean":
                weight[fresh] = reference.mean(dim=0).to(weight.dtype)
            elif init == "random":
                generator = torch.Generator().manual_seed(seed)
                noise = torch.randn(len(fresh), weight.shape[1], generator=generator)
                rows = reference.mean(dim=0).cpu() + noise * reference.std(dim=0).cpu()
                weight[fresh] = rows.to(weight.device, weight.dtype)
            else:
                raise ValueError(f"Unknown token init {init!r}; valid: mean, random.")
    return ids, bool(fresh)
