"""A dense family's training code as its active entries (kernels/dense_code.py), and the switch that puts a
family's loss on them.

A family writes its activation once, over `Support`: on the dense path values(h) is h and latent(p) is p, so
the expressions are the textbook [B, n] ones; on the sparse path values(h) is h at the entries that can be
active, [E], and latent(p) is the per-latent parameter at each entry's latent, [E], so the same expressions
give the code's values there, with gradients for every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_core.kernels.dense_code import entries_above, gather_entries


@dataclass
class EntryCode:
    """vals[e] at (rows[e], latents[e]) of a [batch, n] code, entries sorted by row; the rest is 0."""

    rows: torch.Tensor
    latents: torch.Tensor
    vals: torch.Tensor
    batch: int

    def dense(self, n_latents: int) -> torch.Tensor:
        z = self.vals.new_zeros(self.batch, n_latents)
        return z.index_put_((self.rows, self.latents), self.vals)

    def latent_sums(self, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
        """sum over rows of vals (one per entry), per latent -> [n]."""
        return vals.new_zeros(n_latents).index_add(0, self.latents, vals)


class Support:
    """The entries a family's code and h's gradient can be nonzero at: a sparse list (entries: (rows, latents),
    row-major) or, with entries None, the whole of h."""

    def __init__(self, entries: tuple[torch.Tensor, torch.Tensor] | None, batch: int):
        self.entries, self.batch = entries, batch

    @classmethod
    def above(cls, h: torch.Tensor, bound: torch.Tensor | float) -> Support:
        """Where h [B, n] exceeds `bound` (per latent, or a scalar): sparse when few entries do
        (dense_code.entries_above), else the whole of h."""
        bound = bound if isinstance(bound, torch.Tensor) else h.new_tensor(bound)
        return cls(entries_above(h, bound), h.shape[0])

    def values(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.entries is None else gather_entries(h, *self.entries)

    def latent(self, p: torch.Tensor) -> torch.Tensor:
        return p if self.entries is None else p[self.entries[1]]

    def code(self, z: torch.Tensor) -> torch.Tensor | EntryCode:
        """The code whose values (from values() and latent()) are z."""
        return z if self.entries is None else EntryCode(*self.entries, z, self.batch)


EVERYWHERE = Support(None, 0)  # the dense path: every expression over the whole [B, n]
