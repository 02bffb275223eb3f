"""Attention modes per architecture x attention implementation x padding side x batch size.

bidirectional: the first token's state changes when the last token changes; causal: it does not.
Either way, a padded sequence's states equal the same sequence encoded alone (fp32, atol 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from conftest import arch_impl_cases, tiny_model

from embedkit import Embedder
from embedkit.attention import AttentionModeError, additive_mask, get_mode

TEXT_A = "The quick brown fox jumps over the lazy dog"
TEXT_B = "The quick brown fox jumps over the lazy cat"  # differs only in the last word
OTHERS = ["A much longer sentence that certainly needs more tokens than the others do here", "Hi"]


def states(embedder: Embedder, texts: list[str], padding_side: str) -> list[torch.Tensor]:
    """Per text, the hidden states of its real tokens."""
    tokenized = embedder.tokenize(texts)
    input_ids, attention_mask, _ = embedder.collate(tokenized, padding_side=padding_side)
    with torch.inference_mode():
        hidden = embedder.hidden_states(input_ids, attention_mask)
    return [hidden[i][attention_mask[i].bool()] for i in range(len(texts))]


@pytest.mark.parametrize("arch,impl", arch_impl_cases())
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch", [1, 3])
def test_mode_and_padding(arch, impl, mode, padding_side, batch):
    model, tokenizer = tiny_model(arch, impl)
    embedder = Embedder.from_pretrained(arch, backbone=model, tokenizer=tokenizer, attention=mode)
    assert get_mode(model) == mode
    batch_texts = lambda text: ([text] + OTHERS)[:batch]  # noqa: E731
    a = states(embedder, batch_texts(TEXT_A), padding_side)[0]
    b = states(embedder, batch_texts(TEXT_B), padding_side)[0]
    first_moved = (a[0] - b[0]).abs().max().item()
    if mode == "bidirectional":
        assert first_moved > 1e-4, f"{arch}/{impl} first token did not see the last token"
    else:
        assert first_moved < 1e-5, f"{arch}/{impl} causal first token saw the future ({first_moved})"
    alone = states(embedder, [TEXT_A], padding_side)[0]
    torch.testing.assert_close(a, alone, atol=1e-4, rtol=0)
    if batch == 3:  # every member of a padded batch equals its solo run
        for text, padded in zip(batch_texts(TEXT_A), states(embedder, batch_texts(TEXT_A), padding_side), strict=True):
            torch.testing.assert_close(padded, states(embedder, [text], padding_side)[0], atol=1e-4, rtol=0)


def test_switch_at_run_time():
    model, tokenizer = tiny_model("llama", "sdpa")
    embedder = Embedder.from_pretrained("llama", backbone=model, tokenizer=tokenizer)
    causal = states(embedder, [TEXT_A], "right")[0]
    embedder.set_attention("bidirectional")
    bidir = states(embedder, [TEXT_A], "right")[0]
    embedder.set_attention("causal")
    again = states(embedder, [TEXT_A], "right")[0]
    assert (causal[0] - bidir[0]).abs().max() > 1e-4
    torch.testing.assert_close(causal, again)
    # bidirectional changes the earlier tokens' states in every layer, so the last token differs too
    assert (causal[-1] - bidir[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_bias_hook_reproduces_modes(impl):
    """A bias that returns the base mask unchanged gives the same states as the plain mode (4-D path)."""
    model, tokenizer = tiny_model("qwen2", impl)
    embedder = Embedder.from_pretrained("qwen2", backbone=model, tokenizer=tokenizer, attention="bidirectional")
    plain = states(embedder, [TEXT_A] + OTHERS, "left")
    embedder.attention_bias = lambda ids, mask, base: base
    biased = states(embedder, [TEXT_A] + OTHERS, "left")
    for p, b in zip(plain, biased, strict=True):
        torch.testing.assert_close(p, b, atol=1e-5, rtol=0)
    # a bias that blocks everything above the diagonal turns bidirectional into causal
    def causal_bias(ids, mask, base):
        upper = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        return base.masked_fill(upper, torch.finfo(base.dtype).min)

    embedder.attention_bias = causal_bias
    blocked = states(embedder, [TEXT_A, TEXT_B], "right")
    torch.testing.assert_close(blocked[0][0], blocked[1][0], atol=1e-6, rtol=0)
    embedder.attention_bias = None
    embedder.set_attention("causal")
    causal = states(embedder, [TEXT_A], "right")[0]
    torch.testing.assert_close(blocked[0], causal, atol=1e-5, rtol=0)


def test_additive_mask_is_float_and_blocks():
    mask = additive_mask(torch.tensor([[0, 1, 1]]), causal=True, dtype=torch.float32)
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 3, 3)
    minimum = torch.finfo(torch.float32).min
    assert mask[0, 0, 1, 2] == minimum  # future blocked
    assert mask[0, 0, 2, 0] == minimum  # padding key blocked
    assert mask[0, 0, 2, 1] == 0 and mask[0, 0, 0, 0] == 0  # past open; a pad row keeps itself open


class AlwaysCausal(torch.nn.Module):
    """A stand-in backbone that ignores config.is_causal (like remote code might)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs):
        self.inner.config.is_causal = True
        return self.inner(**kwargs)


def test_architecture_that_stays_causal_is_refused():
    model, tokenizer = tiny_model("llama", "eager", seed=1)  # a private copy: the wrapper mutates its config
    wrapped = AlwaysCausal(model)
    with pytest.raises(AttentionModeError, match="stays causal with config.is_causal=False"):
        Embedder.from_pretrained("x", backbone=wrapped, tokenizer=tokenizer, attention="bidirectional")


def test_unknown_attention_mode():
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match="Unknown attention mode 'bidi'; valid: causal, bidirectional"):
        Embedder.from_pretrained("x", backbone=model, tokenizer=tokenizer, attention="bidi")
