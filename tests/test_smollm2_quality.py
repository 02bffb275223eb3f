"""Slow: SmolLM2-135M reproduces the STS-B test figures measured with plain transformers (BASELINES.md)."""

from __future__ import annotations

import pytest

from embedkit import Embedder
from embedkit.backbone import load_backbone
from embedkit.cli import PROMPT_EOL
from embedkit.evaluation.sts import sts_spearman

pytestmark = pytest.mark.slow

EXPECTED = [  # attention, pooling, template, Spearman
    ("causal", "mean", None, 0.372),
    ("causal", "last", None, 0.316),
    ("bidirectional", "mean", None, 0.169),
    ("causal", "last", PROMPT_EOL, 0.664),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2-135m", dtype="float32")


@pytest.mark.parametrize("attention,pooling,template,expected", EXPECTED)
def test_smollm2_sts_b(smollm2, data_dir, attention, pooling, template, expected):
    backbone, tokenizer = smollm2
    embedder = Embedder.from_pretrained("smollm2-135m", backbone=backbone, tokenizer=tokenizer, attention=attention,
                                        pooling=pooling, template=template, max_length=128)
    assert sts_spearman(embedder, data_dir) == pytest.approx(expected, abs=0.01)
