"""NV-Embed's latent-attention pooling: a trainable pooler, saved as its own sentence-transformers module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from embedkit.io import StrictConfig
from embedkit.pooling.base import Pooler, register_pooler
from embedkit.pooling.basic import first_index


class LatentAttentionConfig(StrictConfig):
    """NV-Embed's latent attention: token states query a trainable latent array, then an MLP, then mean."""

    label = "latent_attention"

    hidden_size: int
    num_latents: int = 512
    num_heads: int = 8
    mlp_ratio: int = 4


@register_pooler
class LatentAttentionPooling(Pooler):
    """NV-Embed latent-attention pooler (Lee et al. 2024, sec. 3.2).

    Queries are the token states; keys and values are ``num_latents`` trainable latents; multi-head
    cross-attention with a residual, a GELU MLP with a residual, then mean over the pool mask. Also a
    sentence-transformers module (``forward(features)`` / ``save`` / ``load``), so saved embedders load in
    ``SentenceTransformer(path, trust_remote_code=True)`` when embedkit is installed. Its ``modules.json`` type
    is ``embedkit.pooling.LatentAttentionPooling`` (the package re-exports it: folders saved before the
    pooling package existed name that path).
    """

    name = "latent_attention"
    trainable = True
    module_folder = "LatentAttentionPooling"
    module_type = "embedkit.pooling.LatentAttentionPooling"
    config_file = "latent_attention.json"
    weights_file = "model.safetensors"

    def __init__(self, config: LatentAttentionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * d**-0.5)
        self.attention = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, d * config.mlp_ratio), nn.GELU(), nn.Linear(d * config.mlp_ratio, d))

    @classmethod
    def build(cls, hidden_size: int, settings: dict | None = None) -> LatentAttentionPooling:
        return cls(LatentAttentionConfig(hidden_size=hidden_size, **(settings or {})))

    def settings(self) -> dict:
        return self.config.to_dict()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.latents.dtype)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        attended, _ = self.attention(x, latents, latents, need_weights=False)
        x = x + attended
        x = x + self.mlp(x)
        weights = pool_mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    # -- embedkit's saved folder -------------------------------------------------------------------------------
    def save_module(self, folder: Path, dimension: int) -> str:
        self.save(str(folder))
        return self.module_type

    @classmethod
    def load_saved(cls, folder: Path) -> LatentAttentionPooling:
        return cls.load(str(folder))

    # -- sentence-transformers module protocol --------------------------------------------------------
    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"]
        prompt_length = features.get("prompt_length")
        pool_mask = mask.clone()
        if prompt_length:
            prompt_length = int(prompt_length[0]) if torch.is_tensor(prompt_length) else int(prompt_length)
            first = first_index(mask)
            positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
            pool_mask[positions < (first + prompt_length).unsqueeze(1)] = 0
        features["sentence_embedding"] = self.pool(features["token_embeddings"], mask, pool_mask)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.hidden_size

    def get_embedding_dimension(self) -> int:
        return self.config.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415

        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / self.config_file).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(out / self.weights_file))

    @classmethod
    def load(cls, model_name_or_path: str, *args, **kwargs) -> LatentAttentionPooling:
        from safetensors.torch import load_file  # noqa: PLC0415

        folder = Path(model_name_or_path)
        subfolder = kwargs.get("subfolder") or ""
        folder = folder / subfolder
        config = LatentAttentionConfig.from_dict(json.loads((folder / cls.config_file).read_text()))
        module = cls(config)
        module.load_state_dict(load_file(str(folder / cls.weights_file)))
        return module
