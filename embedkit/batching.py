"""Tokenize once, sort by length, cut token-budget batches, pad, and restore input order.

Sorting by length means a batch pads to nearly its own length instead of the longest text of the input;
a token budget (not a fixed count) keeps every batch about the same cost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 2048  # per batch, padded: on CPU, batches that stay in cache beat big ones (bench/README.md)
DEFAULT_MAX_BATCH = 512
BATCHES_PER_WORKER = 4  # enough batches that no worker waits long for the last one


@dataclass
class Tokenized:
    """Token ids per text, and how many leading tokens are instruction (attended to, never pooled)."""

    ids: list[list[int]]
    prefix_lengths: list[int]
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject non-strings and empty texts, naming the index so the row can be found."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, got one string: wrap it as [text].")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text at index {i} is {type(text).__name__}, not str: pass strings only.")
        if not text.strip():
            raise ValueError(f"Text at index {i} is empty or whitespace only: drop it or give it content.")
    return texts


def _ends_with_special(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] in set(tokenizer.all_special_ids)


def instruction_length(tokenizer, instruction: str | None) -> int:
    """Tokens an instruction takes at the start of ``instruction + text`` (as sentence-transformers counts)."""
    if not instruction:
        return 0
    ids = tokenizer(instruction)["input_ids"]
    if ids and ids[-1] in set(tokenizer.all_special_ids):
        ids = ids[:-1]
    return len(ids)


def tokenize(
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int,
    instruction: str | None = None,
    template: str | None = None,
    append_eos: bool = False,
) -> Tokenized:
    """Tokenize ``instruction + template(text)`` for each text, truncating the end to ``max_length``.

    Truncation keeps a trailing special token the tokenizer appends (and the EOS of ``append_eos``).
    """
    texts = check_texts(texts)
    if template is not None:
        texts = [template.replace("{text}", t) for t in texts]
    prefix = instruction_length(tokenizer, instruction)
    if instruction:
        texts = [instruction + t for t in texts]
    if prefix >= max_length - 1:
        raise ValueError(f"The instruction takes {prefix} tokens, which leaves no room within "
                         f"max_length={max_length}: shorten it or raise max_length.")
    # we count and report truncation ourselves; silence the tokenizer's own length warning
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    keep_tail = 1 if _ends_with_special(tokenizer) else 0
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("pooling='eos' needs a tokenizer with an EOS token; this one has none.")
    budget = max_length - (1 if append_eos else 0)
    n_truncated = 0
    out = []
    for seq in ids:
        if append_eos and seq and seq[-1] == eos:
            seq = seq[:-1]
        if len(seq) > budget:
            n_truncated += 1
            seq = seq[: budget - keep_tail] + seq[len(seq) - keep_tail:]
        if append_eos:
            seq = seq + [eos]
        out.append(seq)
    return Tokenized(out, [prefix] * len(out), n_truncated)


def plan_batches(
    lengths: Sequence[int], *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_batch: int = DEFAULT_MAX_BATCH
) -> list[list[int]]:
    """Group indices, longest first, so that each padded batch holds at most ``max_batch_tokens`` tokens."""
    return _cut(_longest_first(lengths), lengths, max_batch_tokens, max_batch)


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _cut(order: Sequence[int], lengths: Sequence[int], max_batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Cut indices (longest first) into batches of at most ``max_batch_tokens`` padded tokens, ``max_batch`` texts."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > max_batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_for_workers(
    lengths: Sequence[int], *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_batch: int = DEFAULT_MAX_BATCH,
    workers: int = 1,
) -> list[list[int]]:
    """``plan_batches`` with a budget that gives every worker the same number of equally full batches.

    Workers take batches from one queue, so the encode ends when the fullest worker does. Budget-cut batches
    leave a part-filled last one: 8 full batches and a 60% one keep one of 2 workers busy 7% longer than the
    other. Here the budget shrinks to the smallest one that still cuts a multiple of ``workers`` batches,
    which spreads that remainder over all of them (batches capped by ``max_batch`` texts stay smaller).
    """
    if workers <= 1 or not lengths:
        return plan_batches(lengths, max_batch_tokens=max_batch_tokens, max_batch=max_batch)
    order = _longest_first(lengths)
    high = split_for_workers(lengths, max_batch_tokens, workers)
    plan = _cut(order, lengths, high, max_batch)
    target = -(-len(plan) // workers) * workers
    low = lengths[order[0]]  # the batch count is non-increasing in the budget, and fits at ``high``
    while low < high:
        middle = (low + high) // 2
        trial = _cut(order, lengths, middle, max_batch)
        if len(trial) <= target:
            high, plan = middle, trial
        else:
            low = middle + 1
    return plan


def collate(
    ids: Sequence[Sequence[int]],
    prefix_lengths: Sequence[int],
    *,
    pad_id: int,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest text: returns input_ids, attention_mask and pool_mask (B, L)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    pool = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (seq, prefix) in enumerate(zip(ids, prefix_lengths, strict=True)):
        start = 0 if padding_side == "right" else width - len(seq)
        input_ids[row, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, start:start + len(seq)] = 1
        pool[row, start + min(prefix, len(seq) - 1):start + len(seq)] = 1
    return input_ids, attention, pool


def split_for_workers(lengths: Sequence[int], max_batch_tokens: int, workers: int) -> int:
    """A token budget small enough that every worker gets several batches (they finish together)."""
    if workers <= 1 or not lengths:
        return max_batch_tokens
    share = sum(lengths) // (BATCHES_PER_WORKER * workers)
    return max(min(max_batch_tokens, share), max(lengths))


@contextmanager
def torch_threads(n: int):
    """Set torch's (process-wide) intra-op thread count for a block, then restore it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_batches(batches: Iterable[list[int]], step: Callable[[list[int]], None], workers: int = 1) -> None:
    """Call ``step(batch)`` for every batch, on ``workers`` threads that each run torch single-threaded.

    On a small CPU model, one torch thread per batch and batches in parallel beats every batch spread over
    all cores: the many small element-wise kernels of a decoder layer do not split well across threads
    (bench/README.md measures it). Torch releases the GIL inside its kernels, so threads are enough.
    """
    if workers <= 1:
        for batch in batches:
            step(batch)
        return
    pending = iter(batches)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with torch.inference_mode():
            while not errors:
                with lock:
                    batch = next(pending, None)
                if batch is None:
                    return
                try:
                    step(batch)
                except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(error)

    with torch_threads(1):
        threads = [threading.Thread(target=worker, name=f"embedkit-encode-{i}") for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
