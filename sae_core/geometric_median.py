"""Geometric median by Weiszfeld's iteration: the point minimising the sum of Euclidean distances.

Gao et al. initialise b_pre to it because, unlike the mean, it is not dragged by the few
high-norm activations (e.g. the first token positions).
"""
from __future__ import annotations

import torch


def geometric_median(points: torch.Tensor, max_iter: int = 500, tol: float = 1e-9) -> torch.Tensor:
    """Weiszfeld iterations in float64 from the mean, until a step is below tol times the points' RMS distance
    from their mean (a bound relative to the estimate's norm would stop early when the points share a large
    offset, as a residual stream's do).

    Each iteration is two mat-vecs over q, the points less their mean: the distances from
    ||q||^2 - 2 q.y + ||y||^2 and the weighted sum w^T q, instead of two element-wise passes writing [N, d]
    temporaries (4x faster at 32768 x 384 here). Centring keeps that expansion's cancellation relative to the
    spread, not the offset."""
    p = points.to(torch.float64)
    mean = p.mean(dim=0)
    q = p - mean
    sq = torch.linalg.vector_norm(q, dim=1).square_()
    y = torch.zeros_like(mean)  # relative to the mean
    step_tol = tol * float(sq.mean().sqrt())
    for _ in range(max_iter):
        dist = (sq - 2 * (q @ y) + y.dot(y)).clamp_min_(0).sqrt_()
        # A point coinciding with the estimate would get infinite weight; the floor keeps it finite.
        w = dist.clamp_min_(1e-12).reciprocal_()
        y_next = (w @ q) / w.sum()
        done = float((y_next - y).norm()) <= step_tol
        y = y_next
        if done:
            break
    return (y + mean).to(points.dtype)
