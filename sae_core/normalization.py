"""Per-token input normalisations. Each is x -> (x - shift) / scale with per-token shift and scale,
so the SAE's output is mapped back exactly by x_hat * scale + shift, and metrics are reported in the
original activation space whatever the SAE was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-8


@dataclass
class TokenStats:
    shift: torch.Tensor  # [B, 1]
    scale: torch.Tensor  # [B, 1]


def normalize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, TokenStats | None]:
    if kind == "none":
        return x, None
    shift = x.mean(dim=-1, keepdim=True)
    centred = x - shift
    if kind == "unit_norm":
        scale = centred.norm(dim=-1, keepdim=True)
    elif kind == "standardize":
        scale = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    else:
        raise ValueError(f"unknown normalization {kind!r}")
    scale = scale.clamp_min(_EPS)
    return centred / scale, TokenStats(shift, scale)


def denormalize(x_hat: torch.Tensor, stats: TokenStats | None) -> torch.Tensor:
    return x_hat if stats is None else x_hat * stats.scale + stats.shift
