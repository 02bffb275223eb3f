"""Shared fixtures: the real tiny model, real tokenizers, and tiny random-weight models per architecture."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)

# architecture -> (model_type, tokenizer folder, extra config, attention implementations it supports)
ARCHITECTURES = {
    "llama": ("llama", "llama2", {}, ("eager", "sdpa")),
    "mistral": ("mistral", "llama2", {"sliding_window": 64}, ("eager", "sdpa")),
    "qwen2": ("qwen2", "gpt2", {}, ("eager", "sdpa")),
    "qwen3": ("qwen3", "gpt2", {}, ("eager", "sdpa")),
    "gemma2": ("gemma2", "llama2", {"sliding_window": 64}, ("eager",)),  # Gemma2Model refuses sdpa
    "gemma3": ("gemma3_text", "llama2", {"sliding_window": 64}, ("eager", "sdpa")),
    "phi3": ("phi3", "llama2", {"pad_token_id": None}, ("eager", "sdpa")),
}


@cache
def _tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_for(name: str):
    """A fresh copy of a real tokenizer (parsed once per session)."""
    return copy.deepcopy(_tokenizer(name))


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0):
    """A random-weight base model of ``arch`` (fp32, eval mode) and its real tokenizer.

    Models are built once per session and shared: callers set the attention mode they need.
    """
    return _tiny_model(arch, attn_implementation, seed), tokenizer_for(ARCHITECTURES[arch][1])


@cache
def _tiny_model(arch: str, attn_implementation: str, seed: int):
    model_type, tok_name, extra, _ = ARCHITECTURES[arch]
    config = AutoConfig.for_model(model_type, vocab_size=len(_tokenizer(tok_name)), **SMALL, **extra)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def arch_impl_cases():
    return [(a, impl) for a, (_, _, _, impls) in ARCHITECTURES.items() for impl in impls]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "sts" / "STSBenchmark" / "test.jsonl").is_file():
        pytest.fail(f"shared data missing at {DATA}: clone with ../shared beside the checkout")
    return DATA


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def quantize_embeddings():
    """sentence-transformers' quantize_embeddings: the reference embedkit.quantization's codes must equal."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("sentence_transformers.util.quantization")
    return module.quantize_embeddings
