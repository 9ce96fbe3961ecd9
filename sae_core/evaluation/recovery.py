"""Progressive recovery (Gao et al. 2024 §5.3, Fig. 10): after training, swap the SAE's activation for
TopK(k') over a grid of k' and for JumpReLU(θ) over a grid of θ, and place each point in the L0-NMSE
(and L0-downstream) plane. Works for every family: both are applied to the family's pre-activations.

Default grids: k' = 1, 2, 4, ... up to 4x the training sparsity (k, or the measured L0 for the families
without k), capped at n_latents, plus the training k itself; θ_j = the mean over held-out vectors of their
k'_j-th largest pre-activation, so the JumpReLU curve spans the same L0 range.
"""
from __future__ import annotations

from functools import partial

import torch

from sae_core.evaluation.reconstruction import evaluate_scalars
from sae_core.sae import SAE, apply_test_time_activation

_THRESHOLD_SAMPLE = 1024  # held-out vectors used to place the default thresholds


def k_grid(sae: SAE, l0: float) -> list[int]:
    n = sae.cfg.n_latents
    k_train = getattr(sae.cfg, "k", None)
    top = min(n, 4 * max(1, round(k_train or l0)))
    grid = {2 ** i for i in range(top.bit_length()) if 2 ** i <= top}
    if k_train is not None and k_train <= n:
        grid.add(k_train)
    return sorted(grid)


@torch.no_grad()
def threshold_grid(sae: SAE, x: torch.Tensor, ks: list[int]) -> list[float]:
    xs = x[:_THRESHOLD_SAMPLE].to(sae.net.W_dec.device)
    h, _ = sae.preactivations(xs)
    kth = h.topk(max(ks), dim=-1).values.clamp_min(0)  # [N, max k], descending
    return sorted({float(kth[:, k - 1].mean()) for k in ks}, reverse=True)


def points(sae: SAE, ks: list[int], thresholds: list[float]) -> list[tuple[dict, object]]:
    """(row keys, encoder) per grid point; the encoder maps x to (code, stats) like `sae.encode_code`."""
    return ([({"activation": "topk", "k": k, "threshold": None}, partial(sae.encode_with, k=k)) for k in ks]
            + [({"activation": "jumprelu", "k": None, "threshold": t}, partial(sae.encode_with, threshold=t))
               for t in thresholds])


class _LastBatch:
    """The SAE's pre-activations of the batch last asked for. evaluate_scalars passes every grid point over a
    batch before the next batch, so the grid's encoders share one encoder pass per batch instead of one per
    point. The batch is held, so `is` cannot match another tensor at a reused address."""

    def __init__(self, sae: SAE):
        self.sae, self.x, self.version, self.value = sae, None, None, None

    def __call__(self, x: torch.Tensor):
        if x is not self.x or x._version != self.version:
            self.value = None  # freed before the next batch's are computed
            self.value = self.sae.preactivations(x)
            self.x, self.version = x, x._version
        return self.value


def evaluate_points(sae: SAE, x: torch.Tensor, keys: list[dict], batch_size: int,
                    layer_ids: torch.Tensor | None = None) -> list[dict[str, float]]:
    """nmse, mse, l0, l1 of each grid point (`points`' row keys) over x, as `evaluate` computes them."""
    shared = _LastBatch(sae)

    def encoder(point: dict):
        def encode(xb):
            h, stats = shared(xb)
            return apply_test_time_activation(h, k=point["k"], threshold=point["threshold"], entries=True), stats
        return encode

    return evaluate_scalars(sae, x, [encoder(p) for p in keys], batch_size, layer_ids)
