"""Pooling: token states -> one vector per text.

Every strategy reads a *pool mask*: the attention mask with instruction tokens zeroed, so instructions are
attended to but never averaged in (sentence-transformers' ``include_prompt=False``). All strategies index by
the mask, so left and right padding give the same vectors. Definitions match sentence-transformers'
``Pooling`` so saved models give the same vectors there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

POOLING_MODES = ("mean", "weighted_mean", "last", "eos", "first", "latent_attention")

# our name -> sentence-transformers Pooling mode (latent attention is our own module)
ST_POOLING_MODE = {"mean": "mean", "weighted_mean": "weightedmean", "last": "lasttoken", "eos": "lasttoken",
                   "first": "cls"}


def check_pooling(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling {mode!r}; valid: {', '.join(POOLING_MODES)}.")
    return mode


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (works for left and right padding)."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)


def _first_index(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int32).argmax(dim=1)


def pool(
    mode: str, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor
) -> torch.Tensor:
    """Reduce (B, L, H) hidden states to (B, H) with a fixed (parameter-free) strategy.

    ``attention_mask`` marks real tokens; ``pool_mask`` marks the tokens that may be pooled.
    Sums accumulate in float32 even for bf16 states.
    """
    batch = torch.arange(hidden.shape[0], device=hidden.device)
    if mode in ("last", "eos"):
        return hidden[batch, _last_index(pool_mask)]
    if mode == "first":
        return hidden[batch, _first_index(pool_mask)]
    weights = pool_mask.to(torch.float32)
    if mode == "weighted_mean":
        # position among real tokens, from 1 (instruction tokens count, as in SGPT / sentence-transformers)
        weights = weights * attention_mask.to(torch.float32).cumsum(dim=1)
    elif mode != "mean":
        raise ValueError(f"pool() has no parameter-free mode {mode!r}")
    summed = (hidden.to(torch.float32) * weights.unsqueeze(-1)).sum(dim=1)
    return (summed / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)).to(hidden.dtype)


@dataclass
class LatentAttentionConfig:
    """NV-Embed's latent attention: token states query a trainable latent array, then an MLP, then mean."""

    hidden_size: int
    num_latents: int = 512
    num_heads: int = 8
    mlp_ratio: int = 4


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent-attention pooler (Lee et al. 2024, sec. 3.2).

    Queries are the token states; keys and values are ``num_latents`` trainable latents; multi-head
    cross-attention with a residual, a GELU MLP with a residual, then mean over the pool mask. Also a
    sentence-transformers module (``forward(features)`` / ``save`` / ``load``), so saved embedders load in
    ``SentenceTransformer(path, trust_remote_code=True)`` when embedkit is installed.
    """

    config_file = "latent_attention.json"
    weights_file = "model.safetensors"

    def __init__(self, config: LatentAttentionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * d**-0.5)
        self.attention = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, d * config.mlp_ratio), nn.GELU(), nn.Linear(d * config.mlp_ratio, d))

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.latents.dtype)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        attended, _ = self.attention(x, latents, latents, need_weights=False)
        x = x + attended
        x = x + self.mlp(x)
        weights = pool_mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    # -- sentence-transformers module protocol --------------------------------------------------------
    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"]
        prompt_length = features.get("prompt_length")
        pool_mask = mask.clone()
        if prompt_length:
            prompt_length = int(prompt_length[0]) if torch.is_tensor(prompt_length) else int(prompt_length)
            first = _first_index(mask)
            positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
            pool_mask[positions < (first + prompt_length).unsqueeze(1)] = 0
        features["sentence_embedding"] = self.pool(features["token_embeddings"], pool_mask)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.hidden_size

    def get_embedding_dimension(self) -> int:
        return self.config.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415

        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / self.config_file).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(out / self.weights_file))

    @classmethod
    def load(cls, model_name_or_path: str, *args, **kwargs) -> LatentAttentionPooling:
        from safetensors.torch import load_file  # noqa: PLC0415

        folder = Path(model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        folder = folder / subfolder
        config = LatentAttentionConfig(**json.loads((folder / cls.config_file).read_text()))
        module = cls(config)
        module.load_state_dict(load_file(str(folder / cls.weights_file)))
        return module
