"""Packed forwards: a batch's texts concatenated into a few rows, so random-length texts cost their real tokens.

A padded batch of random-length texts computes every text at the length of its longest one (a server's merged
batch of one-text requests: ~1.6x its real tokens). Packed, each row holds several texts back to back; each
text gets its own positions (restarting at 0, as the padded path gives it) and a block-diagonal attention mask
(causal or bidirectional within the text, nothing across texts), built by transformers' own mask interface
(``masking_utils``: ``packed_sequence_mask_function`` and the sdpa/eager mask builders) and passed as a 4-D
mask, which models take as is. The hidden states are then laid out padded again (one gather), so every pooler
pools exactly what it pools on the padded path.

In causal mode the tokens every text of a batch starts with (a template's or an instruction's head, such as
PromptEOL's ``This sentence : "``) have the same states in every text, so each row computes them once, at its
start: the row's texts continue from there (positions after the prefix) and see it besides themselves
(``shared_prefix_length``). The states and their gradients are those of the padded batch, up to rounding; a step
runs fewer tokens (on SNLI triplets under PromptEOL, 4 of a text's ~21).

What cannot be packed falls back to padding, explicitly (``packing_blocker`` says why): a forward hook (Token
Prepending, GEM change the sequence), an attention bias (per padded position), an attention implementation
without a 4-D mask (flash), texts longer than a sliding window (a 4-D mask replaces the window), or a model
whose packed forward differs from its padded one on a probe (it ignores position ids or the 4-D mask).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    or_masks,
    packed_sequence_mask_function,
)

from embedkit.attention import get_mode, model_inputs
from embedkit.backbone import padding_id
from embedkit.batching import Tokenized

PACKABLE_ATTENTION = ("sdpa", "eager")
# Tokens per packed row. Attention inside a row is computed for every pair of its tokens, across texts too
# (then masked): short rows keep that waste small, long ones keep few tails of padding (docs/serving.md).
DEFAULT_ROW_TOKENS = 128
SHARED_SEGMENT = -1  # the segment id of a row's shared prefix, which every text of the row sees
PROBE_TOLERANCE = 1e-2  # of the states' scale: packed and padded agree far closer; a broken model differs by ~1


def plan_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices grouped into ``ceil(sum / row_tokens)`` rows of near-equal fill: longest first, each text to the
    least-filled row. Rows pad to the fullest one, so balanced rows waste least (first fit would fill one row
    and leave the last nearly empty)."""
    count = max(1, -(-sum(lengths) // max(row_tokens, max(lengths))))
    rows: list[list[int]] = [[] for _ in range(count)]
    fill = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(count), key=fill.__getitem__)
        rows[r].append(i)
        fill[r] += lengths[i]
    return [row for row in rows if row]


@dataclass
class PackedBatch:
    """Rows of packed texts, and how to lay their states out as the padded batch (text order as given)."""

    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor  # (R, W): from 0 in every text (and in a row's padding tail)
    segments: torch.Tensor  # (R, W): one id per text within its row; the shared prefix SHARED_SEGMENT; the tail its own
    gather: torch.Tensor  # (B, L): flat index into (R * W) of each text's tokens, 0 under padding
    attention_mask: torch.Tensor  # (B, L) as ``collate`` gives it (right padding)
    pool_mask: torch.Tensor  # (B, L)

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def shared_prefix_length(model: nn.Module, ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``ids`` share and a packed row can compute once: 0 unless the model attends
    causally (bidirectionally the prefix sees the text), and never a text's last token (each keeps one of its own)."""
    if get_mode(model) != "causal" or len(ids) < 2:
        return 0
    first, limit = ids[0], min(len(seq) for seq in ids) - 1
    length = 0
    while length < limit and all(seq[length] == first[length] for seq in ids):
        length += 1
    return length


def pack(ids: Sequence[Sequence[int]], prefix_lengths: Sequence[int], *, pad_id: int,
         row_tokens: int = DEFAULT_ROW_TOKENS, shared_prefix: int = 0) -> PackedBatch:
    """Pack token ids into rows (see ``plan_rows``); the padded masks equal ``batching.collate``'s. The first
    ``shared_prefix`` tokens (the same in every text) open each row once instead of every text."""
    shared = shared_prefix
    lengths = [len(seq) - shared for seq in ids]  # each text's own tokens
    rows = plan_rows(lengths, max(1, row_tokens - shared))
    width = shared + max(sum(lengths[i] for i in row) for row in rows)
    longest = shared + max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    gather = torch.zeros((len(ids), longest), dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    pool = torch.zeros((len(ids), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, :shared] = torch.tensor(ids[row[0]][:shared], dtype=torch.long)
        positions[r, :shared] = torch.arange(shared)
        segments[r, :shared] = SHARED_SEGMENT
        start = shared
        for segment, i in enumerate(row):
            n = lengths[i]
            input_ids[r, start:start + n] = torch.tensor(ids[i][shared:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(shared, shared + n)
            segments[r, start:start + n] = segment
            gather[i, :shared] = torch.arange(r * width, r * width + shared)
            gather[i, shared:shared + n] = torch.arange(r * width + start, r * width + start + n)
            attention[i, :shared + n] = 1
            pool[i, min(prefix_lengths[i], shared + n - 1):shared + n] = 1
            start += n
        positions[r, start:] = torch.arange(width - start)
        segments[r, start:] = len(row)
    return PackedBatch(input_ids, positions, segments, gather, attention, pool)


def sees_shared_prefix(segments: torch.Tensor):
    """Mask function: every token may see its row's shared prefix (causality is and-ed on top)."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return segments[batch_idx, kv_idx] == SHARED_SEGMENT

    return inner_mask


def block_diagonal_mask(model: nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """The 4-D mask of the model's attention implementation: each token sees only its own text (causally in
    causal mode) and its row's shared prefix, if any; transformers builds it (bool for sdpa, additive float for
    eager)."""
    config = model.config
    base = causal_mask_function if get_mode(model) == "causal" else bidirectional_mask_function
    same_text = packed_sequence_mask_function(segments)
    if bool((segments[:, 0] == SHARED_SEGMENT).any()):
        same_text = or_masks(same_text, sees_shared_prefix(segments))
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:  # quantised embeddings
        dtype = torch.float32
    rows, width = segments.shape
    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=rows, q_length=width, kv_length=width, q_offset=0, kv_offset=0,
        mask_function=and_masks(base, same_text), attention_mask=None,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, dtype=dtype, config=config,
        use_vmap=False, device=segments.device,
    )


def packed_hidden_states(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The backbone's last states of a packed batch, laid out padded: (B, L, H) under ``batch.attention_mask``."""
    mask = block_diagonal_mask(model, batch.segments)
    hidden = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                   use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.gather]


def packing_blocker(embedder, longest: int) -> str | None:
    """Why this embedder's batches cannot be packed (None: they can)."""
    if embedder.forward_hook is not None:
        return "a forward hook (e.g. Token Prepending, GEM) changes how the backbone runs"
    if embedder.attention_bias is not None:
        return "an attention bias is defined per padded position"
    config = embedder.backbone.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKABLE_ATTENTION:
        return f"attn_implementation={impl!r} takes no 4-D mask (packing needs one of {PACKABLE_ATTENTION})"
    window = getattr(config, "sliding_window", None)
    if window and longest > window:
        return f"texts longer than the sliding window ({window} tokens) need the model's own window mask"
    if not probe_packing(embedder.backbone):
        return "the model's packed forward differs from its padded one (it ignores position ids or 4-D masks)"
    return None


@torch.compiler.set_stance("force_eager")  # compiled layers (compilation.py) would compile graphs for these shapes
@torch.inference_mode()
def probe_packing(model: nn.Module) -> bool:
    """Whether two probe texts packed into one row give the states they get padded (once per model and mode)."""
    key = (get_mode(model), getattr(model.config, "_attn_implementation", None))
    cache = model.__dict__.setdefault("_embedkit_packing_probe", {})
    if key not in cache:
        device = model.get_input_embeddings().weight.device
        vocab = model.get_input_embeddings().weight.shape[0]
        texts = [[5, 6, 7, 8, 9], [10, 11, 12]]
        texts = [[t % vocab for t in text] for text in texts]
        batch = pack(texts, [0, 0], pad_id=0, row_tokens=16).to(device)
        packed = packed_hidden_states(model, batch).float()
        padded_ids = torch.tensor([texts[0], texts[1] + [0, 0]], device=device)
        inputs = model_inputs(model, padded_ids, batch.attention_mask)
        padded = model(**inputs, use_cache=False).last_hidden_state.float()
        real = batch.attention_mask.bool()
        scale = padded[real].abs().max().clamp(min=1.0)
        cache[key] = bool(torch.allclose(packed[real], padded[real], atol=PROBE_TOLERANCE * float(scale), rtol=0))
    return cache[key]


def plan_packed_batches(lengths: Sequence[int], *, max_batch_tokens: int, max_batch: int,
                        workers: int = 1) -> list[list[int]]:
    """Indices in batches of at most about ``max_batch_tokens`` real tokens and ``max_batch`` texts, a multiple
    of ``workers`` of them, filled evenly (longest first, each text to the emptiest batch) so that parallel
    workers finish together: a packed forward costs its real tokens, whatever lengths it mixes."""
    total, longest = sum(lengths), max(lengths)
    count = max(-(-total // max(max_batch_tokens, longest)), -(-len(lengths) // max_batch))
    count = min(len(lengths), -(-count // workers) * workers)
    heap = [(0, 0, b) for b in range(count)]  # (tokens, texts, batch)
    batches: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        tokens, texts, b = heapq.heappop(heap)
        batches[b].append(i)
        if texts + 1 < max_batch:  # a full batch takes no more texts (count * max_batch >= texts: one has room)
            heapq.heappush(heap, (tokens + lengths[i], texts + 1, b))
    return batches


def packed_vectors(embedder, tokenized: Tokenized, rows: Sequence[int], row_tokens: int | None = None):
    """The embedder's un-normalised vectors (B, H) of some rows of ``tokenized``, in one packed forward (with
    gradients outside inference mode: training runs its towers through here)."""
    ids = [tokenized.ids[i] for i in rows]
    batch = pack(ids, [tokenized.prefix_lengths[i] for i in rows],
                 pad_id=padding_id(embedder.tokenizer, embedder.backbone), row_tokens=row_tokens or DEFAULT_ROW_TOKENS,
                 shared_prefix=shared_prefix_length(embedder.backbone, ids))
    batch = batch.to(embedder.device)
    hidden = packed_hidden_states(embedder.backbone, batch)
    return embedder.active_pooler.pool(hidden, batch.attention_mask, batch.pool_mask)
