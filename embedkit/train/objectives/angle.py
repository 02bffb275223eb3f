"""AnglE (Li & Li 2023; sentence-transformers' ``AnglELoss``): CoSENT's ranking of scored pairs on the angle
similarity instead of the cosine. Cosine's gradient vanishes near +-1 (saturation); the angle difference in
complex space, with components ``i`` and ``i + D/2`` as real and imaginary parts, does not. This is the
angle term only, as in sentence-transformers; combine it with the cosine term by running a ``cosent`` stage."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from embedkit.train.objectives.base import register_objective
from embedkit.train.objectives.cosent import CoSENT, CoSENTConfig


class AnglEConfig(CoSENTConfig):
    objective: Literal["angle"] = "angle"


def angle_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|cos(a, b) + sin(a, b)|`` after L2 normalisation, pairing components ``i`` and ``i + D/2`` for the sine
    (sentence-transformers' ``pairwise_angle_sim``; an odd width is padded with a zero)."""
    a, b = a.float(), b.float()
    if a.shape[-1] % 2:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    cosines = (a * b).sum(dim=-1)
    first_a, last_a = a.chunk(2, dim=-1)
    first_b, last_b = b.chunk(2, dim=-1)
    sines = (last_a * first_b - first_a * last_b).sum(dim=-1)
    return (cosines + sines).abs()


@register_objective("angle", config=AnglEConfig)
class AnglE(CoSENT):
    config: AnglEConfig
    similarity = staticmethod(angle_similarity)
