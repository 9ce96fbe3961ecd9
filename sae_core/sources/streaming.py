"""Activations computed on the fly from token rows, with no disk cache (Lawson et al. 2024 train this way).

Batch `step` is drawn from a fixed set of token rows: the next slice of an endless stream of epochs, each
a seeded permutation of the training rows, with enough rows to hold the batch's usable vectors; then a
seeded choice among those vectors. Batches thus mix documents (rows from across the text) and positions,
and are a pure function of the step, which keeps resume exact. The mixing buffer is one step's rows of
activations; a cache (activation_cache.py) trades that recomputation for disk.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sae_core.errors import DataError
from sae_core.lm import ActivationExtractor
from sae_core.sources.base import ActivationSource, EpochStream
from sae_core.text.tokens import rows_holding


class StreamingActivations(ActivationSource):
    def __init__(self, extractor: ActivationExtractor, tokens: np.ndarray, excluded: np.ndarray, eval_tokens: int,
                 seed: int = 0, layer: int | None = None, batch_rows: int = 16):
        """layer: one of the extractor's layers (one SAE per layer), or None for all of them (one
        multi-layer SAE: equal numbers per layer in every batch)."""
        self.extractor, self.tokens, self.keep = extractor, tokens, ~excluded
        self.layer_pos = None if layer is None else extractor.layers.index(layer)
        self.n_layers = 1 if layer is not None else len(extractor.layers)
        self.vectors_per_token = self.n_layers
        self.d_in, self.seed, self.batch_rows = extractor.d_model, seed, batch_rows
        eval_end = rows_holding(self.keep.sum(axis=1), eval_tokens)
        if eval_end >= len(tokens):
            raise DataError(f"data.eval_tokens: {eval_tokens:,} leaves no token rows for training "
                            f"({int(self.keep.sum()):,} usable vectors in all)")
        self.eval_rows, self.train_rows = np.arange(eval_end), np.arange(eval_end, len(tokens))
        self._stream = EpochStream(len(self.train_rows),
                                   lambda e: np.random.default_rng([seed, e]).permutation(self.train_rows))
        self.mean_valid = max(1.0, float(self.keep[eval_end:].sum(axis=1).mean()))
        self._eval: torch.Tensor | None = None

    def _vectors(self, rows: np.ndarray) -> torch.Tensor:
        """[layers, usable vectors of these rows, d], in row order."""
        device = next(self.extractor.model.parameters()).device
        parts = []
        for lo in range(0, len(rows), self.batch_rows):
            chunk = rows[lo:lo + self.batch_rows]
            acts = self.extractor(torch.from_numpy(self.tokens[chunk].astype(np.int64)).to(device))
            parts.append(acts[:, torch.from_numpy(self.keep[chunk]).to(device)].cpu())
        acts = torch.cat(parts, dim=1)
        return acts if self.layer_pos is None else acts[self.layer_pos:self.layer_pos + 1]

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        per, extra = divmod(batch_size, self.n_layers)
        need = per + (extra > 0)
        rows_per_step = math.ceil(1.25 * need / self.mean_valid)  # margin for rows with many separators
        rows = self._stream.rows_at(step * rows_per_step, rows_per_step)
        acts = self._vectors(rows)
        while acts.shape[1] < need:  # rare: take further rows of the stream, still deterministic
            more = self._stream.rows_at((step + 1) * rows_per_step + acts.shape[1], rows_per_step)
            acts = torch.cat([acts, self._vectors(more)], dim=1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randperm(acts.shape[1], generator=gen)
        counts = [per + (i < extra) for i in range(self.n_layers)]
        return torch.cat([acts[i, picks[:n]] for i, n in enumerate(counts)])

    def eval_set(self) -> torch.Tensor:
        """Layer-major for a multi-layer SAE: the held-out vectors of the first layer, then the next, as the
        cache's MultiLayerSource holds them."""
        if self._eval is None:
            self._eval = self._vectors(self.eval_rows).flatten(0, 1)
        return self._eval

    def eval_layer_ids(self) -> torch.Tensor | None:
        """The layer of each held-out vector of a multi-layer SAE (None for one layer's SAE), for its
        per-layer metrics: equal numbers per layer, laid out as the cache's MultiLayerSource lays them."""
        if self.layer_pos is not None:
            return None
        per_layer = self.eval_set().shape[0] // self.n_layers
        return torch.repeat_interleave(torch.tensor(self.extractor.layers), per_layer)
