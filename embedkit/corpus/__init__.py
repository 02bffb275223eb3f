"""Corpus encoding: input readers, the sharded atomic vectors folder, its manifest, and resume."""

from embedkit.corpus.encode import DEFAULT_SHARD_SIZE, EncodeResult, encode_corpus
from embedkit.corpus.manifest import VectorSet, open_vectors
from embedkit.corpus.readers import ReaderOptions, Record, read_records

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "EncodeResult",
    "ReaderOptions",
    "Record",
    "VectorSet",
    "encode_corpus",
    "open_vectors",
    "read_records",
]
