"""Geometric median by Weiszfeld's iteration: the point minimising the sum of Euclidean distances.

Gao et al. initialise b_pre to it because, unlike the mean, it is not dragged by the few
high-norm activations (e.g. the first token positions).
"""
from __future__ import annotations

import torch


def geometric_median(points: torch.Tensor, max_iter: int = 500, tol: float = 1e-9) -> torch.Tensor:
    """Weiszfeld iterations in float64 from the mean until the step is below tol (relative)."""
    p = points.to(torch.float64)
    y = p.mean(dim=0)
    for _ in range(max_iter):
        # A point coinciding with the estimate would get infinite weight; the floor keeps it finite.
        w = 1.0 / (p - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * p).sum(dim=0) / w.sum()
        done = (y_next - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_next
        if done:
            break
    return y.to(points.dtype)
