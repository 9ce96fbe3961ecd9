"""The global top-k of latents spread over shards (Gao et al. 2024, appendix D.1).

Each shard selects its own top-m candidates per row, m = min(k, ceil(capacity * k / S)), and the
candidates' values are all-gathered: S * m = capacity * k values per row instead of n. Every shard then
takes the same top-k of the gathered values and keeps the entries of it that are its own. With
capacity >= S every shard contributes k candidates and the selection is exact; with fewer, a row whose
true top-k puts more than m latents on one shard loses the excess to the next-best latents elsewhere.

Unlike the reference code (which keeps every local value >= the k-th gathered value, so ties can keep
more than k), exactly k entries win per row: positions in the gathered tensor break ties identically on
every shard.
"""
from __future__ import annotations

import math

import torch

from sae_core.parallel.mesh import Mesh


def shard_candidates(k: int, mesh: Mesh, n_local: int) -> int:
    """Candidates each shard contributes to a global top-k (k itself in a single process)."""
    if mesh.shards == 1:
        return min(k, n_local)
    return min(k, n_local, math.ceil(mesh.capacity * k / mesh.shards))


def keep_global_topk(vals: torch.Tensor, k: int, mesh: Mesh) -> torch.Tensor:
    """Mask [B, m] of this shard's candidates `vals` [B, m] (any order, the same m on every shard) that are
    among the top k of all shards' candidates of the row."""
    gathered = mesh.gather(vals.detach())
    m = vals.shape[1]
    winners = gathered.topk(min(k, gathered.shape[1]), dim=1, sorted=False).indices
    mask = torch.zeros(gathered.shape, dtype=torch.bool, device=vals.device).scatter_(1, winners, True)
    return mask[:, mesh.shard * m:(mesh.shard + 1) * m]
