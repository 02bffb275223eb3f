"""Soft causal -> bidirectional mask: exact end points (alpha 0 = causal, alpha >= 1 = bidirectional, as masks
and as model outputs), monotone opening in between, the three weightings, padding, and the per-step schedule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from embedkit import Embedder
from embedkit.attention import additive_mask
from embedkit.methods.soft_mask import (
    SoftMaskSchedule,
    schedule_from_settings,
    soft_mask_bias,
    soft_mask_values,
)

TEXTS = ["The quick brown fox jumps over the lazy dog", "A cat sat", "Hello there my friend"]
WEIGHTS = ["linear", "l_over_i", "i_over_l"]


def masks(padding_side="right"):
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if padding_side == "left":
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return torch.zeros_like(mask), mask


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_end_points_are_the_exact_mode_masks(weight, padding_side):
    ids, mask = masks(padding_side)
    base = additive_mask(mask, causal=True, dtype=torch.float32)
    for alpha in (0.0, -0.5):
        assert torch.equal(soft_mask_bias(alpha, weight)(ids, mask, base), base)
    bidirectional = additive_mask(mask, causal=False, dtype=torch.float32)
    for alpha in (1.0, 3.0):
        assert torch.equal(soft_mask_bias(alpha, weight)(ids, mask, base), bidirectional)


@pytest.mark.parametrize("weight", WEIGHTS)
def test_values_open_monotonically_and_keep_padding_blocked(weight):
    _, mask = masks("left")
    previous = soft_mask_values(0.0, mask, weight)
    for alpha in (0.1, 0.3, 0.6, 0.9):
        values = soft_mask_values(alpha, mask, weight)
        assert (values >= previous).all()
        assert torch.equal(values.tril(), previous.tril())  # on/below the diagonal: untouched
        assert (values[1, :, :2] == torch.eye(5)[:, :2]).all()  # padding keys: blocked (padding rows: self)
        previous = values
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (previous[0][upper] > 0).all() and (previous[0] <= 1).all()


def test_weightings_follow_their_formulas():
    mask = torch.ones(1, 4, dtype=torch.long)
    alpha, length = 0.2, 4
    linear = soft_mask_values(alpha, mask, "linear")[0]
    l_over_i = soft_mask_values(alpha, mask, "l_over_i")[0]
    i_over_l = soft_mask_values(alpha, mask, "i_over_l")[0]
    for i in range(4):
        for j in range(i + 1, 4):
            assert linear[i, j] == pytest.approx(alpha)
            assert l_over_i[i, j] == pytest.approx(min(alpha * length / (i + 1), 1))
            assert i_over_l[i, j] == pytest.approx(alpha * (i + 1) / length)


def test_bias_is_the_log_of_the_values():
    _, mask = masks("right")
    base = additive_mask(mask, causal=True, dtype=torch.float32)
    bias = soft_mask_bias(0.5, "l_over_i")(None, mask, base)[:, 0]
    values = soft_mask_values(0.5, mask, "l_over_i")
    open_ = values > 0
    torch.testing.assert_close(bias[open_], torch.log(values[open_]))
    assert (bias[~open_] == torch.finfo(torch.float32).min).all()


def hidden(embedder: Embedder, padding_side: str) -> list[torch.Tensor]:
    ids, mask, _ = embedder.collate(embedder.tokenize(TEXTS), padding_side=padding_side)
    with torch.inference_mode():
        out = embedder.hidden_states(ids, mask)
    return [out[i][mask[i].bool()] for i in range(len(TEXTS))]


@pytest.mark.parametrize("arch,impl,padding_side", [("qwen2", "sdpa", "left"), ("llama", "eager", "right")])
def test_model_outputs_at_the_end_points(arch, impl, padding_side):
    model, tokenizer = tiny_model(arch, impl)
    embedder = Embedder.from_pretrained(arch, backbone=model, tokenizer=tokenizer, attention="bidirectional")
    bidirectional = hidden(embedder, padding_side)
    embedder.set_attention("causal")
    causal = hidden(embedder, padding_side)
    for mode in ("causal", "bidirectional"):  # the bias decides, whatever the model's mode
        embedder.set_attention(mode)
        embedder.attention_bias = soft_mask_bias(0.0, "l_over_i")
        for got, want in zip(hidden(embedder, padding_side), causal, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        embedder.attention_bias = soft_mask_bias(1.0, "l_over_i")
        for got, want in zip(hidden(embedder, padding_side), bidirectional, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        embedder.attention_bias = soft_mask_bias(0.5, "l_over_i")
        middle = hidden(embedder, padding_side)[0]
        assert (middle[0] - causal[0][0]).abs().max() > 1e-4  # the first token now sees the future
        assert (middle[0] - bidirectional[0][0]).abs().max() > 1e-5
    embedder.attention_bias = None
    embedder.set_attention("causal")


def test_schedule_ramps_alpha_and_sets_the_bias():
    schedule = SoftMaskSchedule(100, weight="i_over_l", tau=40)
    assert [schedule.alpha(t) for t in (0, 10, 40, 90)] == [0.0, 0.25, 1.0, 1.0]

    class Holder:
        attention_bias = None

    holder = Holder()
    schedule(20, holder)
    assert holder.attention_bias.alpha == 0.5 and holder.attention_bias.weight == "i_over_l"
    assert math.isclose(SoftMaskSchedule(100).tau, 50)  # default: open by half-way
    assert schedule_from_settings({"tau_fraction": 0.25}, None, 80).tau == 20
    with pytest.raises(ValueError, match="Unknown soft_mask settings"):
        schedule_from_settings({"steps": 3}, None, 80)
    with pytest.raises(ValueError, match="Unknown soft-mask weight"):
        SoftMaskSchedule(10, weight="quadratic")
    with pytest.raises(ValueError, match="not both"):
        SoftMaskSchedule(10, tau=3, tau_fraction=0.5)
