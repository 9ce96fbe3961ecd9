"""One SAE over several layers (Lawson et al. 2024, appendix A): every layer's vectors are separate
examples; each training batch holds equal numbers from each layer (the first batch_size % L layers one
more when batch_size is not a multiple of L), and the layer of every held-out vector is kept for
per-layer metrics."""
from __future__ import annotations

import torch

from sae_core.errors import ConfigError
from sae_core.sources.base import ActivationSource


class MultiLayerSource(ActivationSource):
    def __init__(self, sources: list[ActivationSource], layers: list[int]):
        if len(sources) != len(layers) or not sources:
            raise ConfigError("MultiLayerSource: one source per layer is needed")
        dims = {s.d_in for s in sources}
        if len(dims) != 1:
            raise ConfigError(f"hook.layers: layers differ in width {sorted(dims)}; one SAE needs one d_in")
        self.sources, self.layers, self.d_in = sources, list(layers), dims.pop()
        self.vectors_per_token = len(sources)
        self._eval: torch.Tensor | None = None

    def _counts(self, batch_size: int) -> list[int]:
        per, extra = divmod(batch_size, len(self.sources))
        return [per + (i < extra) for i in range(len(self.sources))]

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        return torch.cat([s.train_batch(step, n) for s, n in zip(self.sources, self._counts(batch_size))])

    def batch_layer_ids(self, batch_size: int) -> torch.Tensor:
        """The layer of each row of train_batch(·, batch_size)."""
        return torch.repeat_interleave(torch.tensor(self.layers), torch.tensor(self._counts(batch_size)))

    def eval_set(self) -> torch.Tensor:
        if self._eval is None:
            self._eval = torch.cat([s.eval_set() for s in self.sources])
        return self._eval

    def eval_layer_ids(self) -> torch.Tensor:
        """The layer of each row of eval_set() (layer-major: every vector of the first layer, then the next)."""
        sizes = torch.tensor([s.eval_set().shape[0] for s in self.sources])
        return torch.repeat_interleave(torch.tensor(self.layers), sizes)
