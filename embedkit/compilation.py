"""Compile the backbone's decoder layers with ``torch.compile`` for faster encoding on CPU.

A decoder layer's element-wise kernels (RMSNorm, rotary, SiLU, residual adds) are memory-bound and take a large
share of an eager forward on CPU; inductor fuses them. Each layer is compiled in place (``nn.Module.compile``),
with dynamic shapes, so the module tree, the state dict and the fingerprint stay as they were; the layers are
alike, so inductor's cache compiles their code once. The first batches pay the compile time; long jobs
(corpus encoding, evaluation) gain it back many times (bench/README.md has the figures).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from embedkit.backbone import decoder_layers

logger = logging.getLogger(__name__)

GRAPHS_PER_LAYER = 8  # shape variants each layer may keep (batch or length 1 specialise, grad vs inference mode)
# Inductor's C++ wrapper runs a whole layer's graph in C++ without the GIL. Its default Python wrapper calls each
# fused kernel with the GIL held, so encode's worker threads queued for it (bench/README.md measures the gain).
INDUCTOR_OPTIONS = {"cpp_wrapper": True}


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many layers were compiled.

    All layers run one code object (``Module._call_impl``), so dynamo's per-code cache must hold a graph for
    each layer: the limits are raised to fit, or layers past the default limit of 8 would silently run eager.
    """
    layers = decoder_layers(model)
    config = torch._dynamo.config
    needed = GRAPHS_PER_LAYER * len(layers)
    config.cache_size_limit = max(config.cache_size_limit, needed)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, needed)
    for layer in layers:
        layer.compile(dynamic=True, options=INDUCTOR_OPTIONS)
    logger.info("compiled %d decoder layers (torch.compile, dynamic shapes, C++ wrapper)", len(layers))
    return len(layers)


def compile_pays(setting: bool | str, model: nn.Module) -> bool:
    """Resolve a ``compile`` setting of ``True``, ``False`` or ``"auto"`` for ``model``. ``auto`` compiles a
    float32 model on CPU only: training steps ran 8-27 % faster compiled there, +3 % (within drift) in bfloat16,
    not worth minutes of compiling (docs/training.md, "CPU notes"); other devices were not measured."""
    if setting != "auto":
        return bool(setting)
    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and parameter.dtype == torch.float32


def is_compiled(model: nn.Module) -> bool:
    """Whether ``compile_decoder_layers`` ran on this model."""
    return all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model))
