"""STS scoring: Spearman of cosine similarity against gold scores (the figure BASELINES.md reports)."""

from __future__ import annotations

import os

import numpy as np
from scipy.stats import spearmanr

from embedkit.datasets import read_sts


def cosine_spearman(a: np.ndarray, b: np.ndarray, gold) -> float:
    """Spearman correlation between row-wise cosine similarity of a and b and the gold scores."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return float(spearmanr((a * b).sum(axis=1), np.asarray(gold)).statistic)


def sts_spearman(embedder, data_dir: str | os.PathLike, split: str = "test", task: str = "STSBenchmark",
                 **encode_kwargs) -> float:
    """Encode both sides of an STS split once (unique sentences) and return the cosine Spearman."""
    s1, s2, gold = read_sts(data_dir, split, task)
    unique = list(dict.fromkeys(s1 + s2))
    vectors = embedder.encode(unique, **encode_kwargs)
    index = {text: i for i, text in enumerate(unique)}
    return cosine_spearman(vectors[[index[t] for t in s1]], vectors[[index[t] for t in s2]], gold)
