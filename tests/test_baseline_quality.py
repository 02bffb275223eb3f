"""Slow: real backbones reproduce the STS-B test figures measured with plain transformers (BASELINES.md)."""

from __future__ import annotations

import pytest

from embedkit import Embedder
from embedkit.backbone import load_backbone
from embedkit.cli.demo import PROMPT_EOL
from embedkit.evaluation.sts import sts_spearman

pytestmark = pytest.mark.slow

SMOLLM2 = [  # attention, pooling, template, Spearman (float32)
    ("causal", "mean", None, 0.372),
    ("causal", "last", None, 0.316),
    ("bidirectional", "mean", None, 0.169),
    ("causal", "last", PROMPT_EOL, 0.664),
]
GEMMA3 = [  # bfloat16, as measured in BASELINES.md
    ("causal", "mean", None, 0.379),
    ("bidirectional", "mean", None, 0.576),
    ("causal", "last", PROMPT_EOL, 0.647),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def gemma3():
    return load_backbone("gemma3-270m", dtype="bfloat16")


def score(backbone_and_tokenizer, spec, data_dir, attention, pooling, template) -> float:
    backbone, tokenizer = backbone_and_tokenizer
    embedder = Embedder.from_pretrained(spec, backbone=backbone, tokenizer=tokenizer, attention=attention,
                                        pooling=pooling, template=template, max_length=128)
    return sts_spearman(embedder, data_dir)


@pytest.mark.parametrize("attention,pooling,template,expected", SMOLLM2)
def test_smollm2_sts_b(smollm2, data_dir, attention, pooling, template, expected):
    assert score(smollm2, "smollm2-135m", data_dir, attention, pooling, template) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("attention,pooling,template,expected", GEMMA3)
def test_gemma3_sts_b(gemma3, data_dir, attention, pooling, template, expected):
    assert score(gemma3, "gemma3-270m", data_dir, attention, pooling, template) == pytest.approx(expected, abs=0.01)
