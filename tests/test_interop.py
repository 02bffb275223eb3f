"""A saved bidirectional embedder is served as such by tools that know no embedkit: its config.json carries
``is_causal: false``, and ``transformers.AutoModel.from_pretrained(folder)`` alone computes embedkit's hidden
states (what vLLM and TEI read as well; see docs/serving.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from embedkit.embedder import open_model

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
TEXTS = ["Once upon a time there was a little cat.", "She ran.", "The sun was warm and the birds sang all day."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    embedder = open_model(STORIES, attention="bidirectional", pooling="mean", dtype="float32")
    folder = tmp_path_factory.mktemp("interop") / "bidirectional"
    embedder.save(folder)
    return embedder, folder


def test_saved_bidirectional_config_says_is_causal_false(saved, tmp_path):
    _, folder = saved
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    causal = tmp_path / "causal"
    open_model(STORIES, dtype="float32").save(causal)
    assert json.loads((causal / "config.json").read_text())["is_causal"] is True


def test_plain_transformers_computes_embedkits_hidden_states(saved):
    embedder, folder = saved
    model = AutoModel.from_pretrained(folder).eval()  # transformers only: no embedkit code involved
    assert model.config.is_causal is False
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # right padding, as saved
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = embedder.hidden_states(ids, mask)
        causal = open_model(STORIES, dtype="float32").hidden_states(ids, mask)
    torch.testing.assert_close(plain[real], ours[real], atol=1e-5, rtol=1e-5)
    assert (plain[real] - causal[real]).abs().max() > 0.1  # so the equality above is the bidirectional mode's
    pooled = (plain * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # 1_Pooling: mean over real tokens
    vectors = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(vectors, torch.from_numpy(embedder.encode(TEXTS)), atol=1e-4, rtol=1e-4)
