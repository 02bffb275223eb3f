"""How the server runs one merged batch through the model: how many parallel workers the batch is worth.

``Embedder.encode`` spreads its batches over one single-threaded worker per core, which pays on a corpus
(many full token-budget batches). A server's merged batch is usually small: 32 one-text requests are ~350
tokens; padded, such batches ran faster as forwards on all intra-op threads than on single-threaded workers
until they filled a token budget per worker (docs/serving.md). So a padded merged batch gets parallel workers
only when it fills a token budget per worker. Packed forwards (embedkit/packing.py)
cost a batch's real tokens instead of its padded ones; the server uses them whenever the model allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from embedkit.batching import Tokenized
from embedkit.packing import DEFAULT_ROW_TOKENS, packing_blocker
from embedkit.serving.config import SERVE_MAX_BATCH_TOKENS, SERVE_PACKED_BATCH_TOKENS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCall:
    """``ModelCall(embedder, max_batch_tokens, workers)(tokenized)``: the rows' vectors, in order."""

    embedder: object
    max_batch_tokens: int
    workers: int
    packed: bool = False

    @classmethod
    def build(cls, embedder, *, packed: bool, max_batch_tokens: int | None, workers: int) -> ModelCall:
        """Packed forwards when asked for and the model allows it (else padded, and the log says why), each with
        its default budget unless one is given. Run it on the model's thread: the packing probe runs the model.
        On CPU, packed forwards run sdpa attention as eager matmul + softmax: faster on their 4-D masks."""
        reason = packing_blocker(embedder, embedder.config.max_length) if packed else "packing is switched off"
        switched = reason is None and embedder.device.type == "cpu" and embedder.use_eager_attention()
        if switched:
            reason = packing_blocker(embedder, embedder.config.max_length)  # the probe, under eager attention
        if reason is None:
            logger.info("forwards: packed, %d-token rows%s", DEFAULT_ROW_TOKENS,
                        ", eager attention" if switched else "")
        else:
            logger.info("forwards: padded (%s)", reason)
        default = SERVE_PACKED_BATCH_TOKENS if reason is None else SERVE_MAX_BATCH_TOKENS
        return cls(embedder, max_batch_tokens or default, workers, packed=reason is None)

    def workers_for(self, tokenized: Tokenized) -> int:
        """Padded: ``workers`` for a batch with at least a full token budget per worker, else 1 (all intra-op
        threads). Packed: ``workers`` whenever each gets a text; the batch splits into equal real-token halves,
        and single-threaded workers do not stall at every kernel when the event loop takes a core (measured in
        docs/serving.md)."""
        if self.packed:
            return max(1, min(self.workers, len(tokenized)))
        tokens = sum(map(len, tokenized.ids))
        return self.workers if tokens >= self.workers * self.max_batch_tokens else 1

    def __call__(self, tokenized: Tokenized) -> np.ndarray:
        return self.embedder.encode_tokenized(tokenized, max_batch_tokens=self.max_batch_tokens,
                                              workers=self.workers_for(tokenized), show_progress_bar=False,
                                              packed=self.packed)
