"""Soft causal -> bidirectional transition (Conan-embedding-v2): open the mask above the diagonal gradually.

As a multiplicative mask ``M`` (1 = attend, 0 = blocked): entries on and below the diagonal are 1; an entry
above it (query i, key j > i) is ``min(alpha * f(i, j, l), 1)``, with ``alpha = t / tau`` growing over the
training steps t. It is applied as an additive log-bias, ``log M`` (log 0 = blocked), through the core's
``embedder.attention_bias`` hook, so attention weights become ``M_ij * exp(s_ij) / sum_k M_ik * exp(s_ik)``.

End points are exact: ``alpha <= 0`` returns the causal mask and ``alpha >= 1`` the bidirectional mask, the
very tensors ``embedkit.attention.additive_mask`` builds for those modes.

The paper's ``f`` is ambiguous, so it is pluggable (``register_weight``). Positions count real tokens from 1
(padding side does not matter) and ``l`` is the row's real length:

* ``linear``: f = 1, every entry above the diagonal equals alpha (a plain linear ramp);
* ``l_over_i``: f = l / i >= 1, early queries open first; fully open at alpha = 1;
* ``i_over_l``: f = i / l <= 1, late queries open first. Read literally it reaches only i / l at alpha = 1,
  so the last step to alpha >= 1 closes the remaining gap at once (the exact-endpoint rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from embedkit.attention import AttentionBias, additive_mask
from embedkit.io import StrictConfig

# (query positions (B, L, 1), key positions (B, 1, L), lengths (B, 1, 1)), all float, 1-based -> f (B, L, L)
WeightFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHTS: dict[str, WeightFn] = {}


def register_weight(name: str) -> Callable[[WeightFn], WeightFn]:
    def wrap(fn: WeightFn) -> WeightFn:
        WEIGHTS[name] = fn
        return fn

    return wrap


@register_weight("linear")
def _linear(i: torch.Tensor, j: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(i * j)


@register_weight("l_over_i")
def _l_over_i(i: torch.Tensor, j: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return (length / i).expand(-1, -1, j.shape[-1])


@register_weight("i_over_l")
def _i_over_l(i: torch.Tensor, j: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return (i / length).expand(-1, -1, j.shape[-1])


def _weight(name: str) -> WeightFn:
    if name not in WEIGHTS:
        raise ValueError(f"Unknown soft-mask weight {name!r}; valid: {', '.join(sorted(WEIGHTS))}.")
    return WEIGHTS[name]


def soft_mask_values(alpha: float, attention_mask: torch.Tensor, weight: str = "linear") -> torch.Tensor:
    """The multiplicative mask (B, L, L) in [0, 1]: 1 on/below the diagonal, min(alpha f, 1) above it, 0 for
    padding keys (and padding queries see only themselves)."""
    real = attention_mask.bool()
    batch, length = real.shape
    positions = attention_mask.long().cumsum(-1).to(torch.float32)  # 1-based among real tokens
    lengths = positions[:, -1:].clamp(min=1).unsqueeze(-1)
    i, j = positions.unsqueeze(-1).clamp(min=1), positions.unsqueeze(1).clamp(min=1)
    upper = torch.ones(length, length, dtype=torch.bool, device=real.device).triu(1)
    values = (alpha * _weight(weight)(i, j, lengths)).clamp(max=1.0) if alpha > 0 else torch.zeros(
        batch, length, length, device=real.device)
    values = torch.where(upper, values, torch.ones_like(values))
    pair = real[:, :, None] & real[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=real.device)
    return torch.where(pair, values, eye.to(values.dtype).expand_as(values))


def soft_mask_bias(alpha: float, weight: str = "linear") -> AttentionBias:
    """An ``embedder.attention_bias``: the additive (B, 1, L, L) log of ``soft_mask_values`` at ``alpha``."""
    _weight(weight)  # fail on a bad name now, not at the first forward

    def bias(input_ids: torch.Tensor, attention_mask: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        dtype = base.dtype
        if alpha <= 0:
            return additive_mask(attention_mask, causal=True, dtype=dtype)
        if alpha >= 1:
            return additive_mask(attention_mask, causal=False, dtype=dtype)
        values = soft_mask_values(alpha, attention_mask, weight)
        blocked = torch.finfo(dtype).min
        logs = torch.log(values).clamp(min=blocked)
        return logs.masked_fill(values <= 0, blocked).to(dtype).unsqueeze(1)

    bias.alpha = alpha  # type: ignore[attr-defined]  (for logging and tests)
    bias.weight = weight  # type: ignore[attr-defined]
    return bias


def ramp(step: int, tau: float) -> float:
    """alpha(t) = t / tau (0 at the first step; 1 from step tau on)."""
    if tau <= 0:
        return 1.0
    return min(1.0, step / tau)


class SoftMaskSchedule:
    """Per-step schedule: sets ``embedder.attention_bias`` to the soft mask at ``alpha = step / tau``.

    ``tau`` in steps, or ``tau_fraction`` of the stage's steps (default 0.5: the second half trains with the
    bidirectional mask used at inference).
    """

    def __init__(self, total_steps: int, *, weight: str = "linear", tau: int | None = None,
                 tau_fraction: float | None = None):
        _weight(weight)
        if tau is not None and tau_fraction is not None:
            raise ValueError("soft_mask: give tau (steps) or tau_fraction, not both.")
        if tau is not None and tau < 0:
            raise ValueError(f"soft_mask: tau must be >= 0 steps, got {tau}.")
        if tau_fraction is not None and not 0 <= tau_fraction <= 1:
            raise ValueError(f"soft_mask: tau_fraction must be in [0, 1], got {tau_fraction}.")
        self.weight = weight
        self.tau = float(tau) if tau is not None else (0.5 if tau_fraction is None else tau_fraction) * total_steps

    def alpha(self, step: int) -> float:
        return ramp(step, self.tau)

    def __call__(self, step: int, embedder) -> None:
        embedder.attention_bias = soft_mask_bias(self.alpha(step), self.weight)


class SoftMaskSettings(StrictConfig):
    """A recipe stage's ``soft_mask`` settings (see ``SoftMaskSchedule``)."""

    label = "soft_mask settings"

    weight: str = "linear"
    tau: int | None = None
    tau_fraction: float | None = None


def schedule_from_settings(settings: dict, stage_config, total_steps: int) -> SoftMaskSchedule:
    """The trainer's attention-schedule factory signature ``(settings, stage_config, total_steps)``."""
    return SoftMaskSchedule(total_steps, **SoftMaskSettings.from_dict(settings).to_dict())
