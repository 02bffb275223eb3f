"""The one place that decides what attends to what.

Modes use transformers' own mechanisms, never copied modeling code:

* ``causal``: the model as trained.
* ``bidirectional``: ``config.is_causal = False``; transformers' mask builder then makes a padding-only
  mask (checked for Llama, Mistral, Qwen2/3, Gemma/2/3, Phi3, GPT-2). Survives save/load, peft and
  sentence-transformers loading, because it is a config field.
* an *attention bias*: a callable that returns a full additive 4-D float mask per batch (GEM's masks, the
  soft causal->bidirectional transition). transformers passes a 4-D mask through as is. A 4-D mask applies
  to every layer, so sliding-window layers (Mistral, Gemma2/3) see it instead of their window.

Because an architecture might ignore ``is_causal`` (remote code, a future refactor), switching to
bidirectional runs a probe: change the last token and check that the first token's state moves, and that
padding still leaves real tokens untouched. A model that fails is refused, never silently causal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ATTENTION_MODES = ("causal", "bidirectional")

# (input_ids, attention_mask 2-D, base additive mask (B, 1, L, L)) -> additive mask (B, 1, L, L)
AttentionBias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionModeError(ValueError):
    """An attention mode cannot be guaranteed for this model."""


def check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"Unknown attention mode {mode!r}; valid: {', '.join(ATTENTION_MODES)}.")
    return mode


def _configs(model: nn.Module):
    """The config objects whose ``is_causal`` the mask builder reads (top level and text sub-config)."""
    config = model.config
    yield config
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        yield text_config


def get_mode(model: nn.Module) -> str:
    return "causal" if getattr(model.config, "is_causal", True) else "bidirectional"


def set_mode(model: nn.Module, mode: str, *, verify: bool = True) -> None:
    """Switch a loaded model between causal and bidirectional attention, at run time."""
    check_mode(mode)
    for config in _configs(model):
        config.is_causal = mode == "causal"
    if verify:
        verify_mode(model, mode)


def use_eager_attention(model: nn.Module) -> bool:
    """Switch an ``sdpa`` model to transformers' eager attention (matmul + softmax); True if it switched.

    Two paths run faster on it on CPU (profiles in bench/README.md and docs/serving.md): compiled layers, since
    inductor fuses eager attention with the rest of the layer while sdpa's CPU kernel stays opaque to it; and
    packed rows, whose explicit 4-D masks make sdpa's CPU kernel slower than a plain matmul + softmax.
    Re-probe the attention mode afterwards (``Embedder.use_eager_attention`` does).
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation("eager")
    return True


def additive_mask(
    attention_mask: torch.Tensor, *, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The (B, 1, L, L) additive float mask for a mode: 0 where allowed, dtype-min where blocked.

    Float, not bool: eager attention adds the mask, so a bool mask would mask nothing. Rows of padding
    queries keep their own position open so no row is fully blocked (no NaN under sdpa).
    """
    batch, length = attention_mask.shape
    allowed = attention_mask[:, None, None, :].bool().expand(batch, 1, length, length)
    if causal:
        tril = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = allowed & tril
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    allowed = allowed | eye
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def model_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    bias: AttentionBias | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the backbone's forward under its current mode and an optional bias.

    Position ids are explicit (cumulative over real tokens) so that left padding gives the same outputs as
    no padding.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if bias is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:  # quantised embeddings
        dtype = torch.float32
    base = additive_mask(attention_mask, causal=get_mode(model) == "causal", dtype=dtype)
    mask = bias(input_ids, attention_mask, base).to(dtype).clamp(min=torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


@torch.compiler.set_stance("force_eager")  # compiled layers (compilation.py) would compile graphs for these shapes
@torch.inference_mode()
def verify_mode(model: nn.Module, mode: str) -> None:
    """Probe that the model really behaves as ``mode`` says; raise AttentionModeError if it does not."""
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]], device=device) % vocab
        ones = torch.ones_like(ids)
        hidden = model(**model_inputs(model, ids, ones)).last_hidden_state.float()
        first_moved = not torch.allclose(hidden[0, 0], hidden[1, 0], atol=1e-6, rtol=0)
        # padding check: the same sequence right-padded must keep its real tokens' states
        padded = torch.cat([ids[:1], ids[:1, :1]], dim=1)
        pad_mask = torch.cat([ones[:1], torch.zeros_like(ones[:1, :1])], dim=1)
        hidden_pad = model(**model_inputs(model, padded, pad_mask)).last_hidden_state.float()
        scale = hidden[0].abs().max().clamp(min=1.0)
        padding_hidden = torch.allclose(hidden_pad[0, :4], hidden[0], atol=1e-2 * float(scale), rtol=0)
    finally:
        model.train(was_training)
    arch = type(model).__name__
    impl = getattr(model.config, "_attn_implementation", "?")
    if mode == "bidirectional" and not first_moved:
        raise AttentionModeError(
            f"{arch} (attn_implementation={impl!r}) stays causal with config.is_causal=False: bidirectional "
            "attention cannot be guaranteed for this architecture. Try attn_implementation='eager' or "
            "'sdpa', or use attention='causal'."
        )
    if mode == "causal" and first_moved:
        raise AttentionModeError(f"{arch} (attn_implementation={impl!r}) is not causal although asked to be.")
    if not padding_hidden:
        raise AttentionModeError(
            f"{arch} (attn_implementation={impl!r}) lets padding change real tokens in {mode} mode; "
            "padding cannot be hidden reliably. Try another attn_implementation."
        )
