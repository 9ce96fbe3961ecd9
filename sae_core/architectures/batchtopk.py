"""BatchTopK SAE (Bussmann et al. 2024): TopK relaxed to the batch, with AuxK as in TopK.

Training keeps the top k*B entries of ReLU(W_enc (x - b_pre) + b_enc) over the whole batch of B vectors,
so L0 is k on average but varies per vector. Because that couples the vectors of a batch, inference
uses a global threshold instead (Leask et al. 2025, eq. 8, following Bussmann et al. 2024), "estimated
on the training data":

    theta = E_X[min{z_ij(X) | z_ij(X) > 0}]

the smallest activation kept by the batch-level top-(B k) of a training batch X, averaged over batches.
It is estimated once training ends (`finalize`), with the final weights (the EMA weights when the run
keeps those), on the last `threshold_batches` training batches of the run (fewer if it had fewer steps).
The batch's cut spans every shard's latents and every replica's rows, so the estimate is the same
whatever the layout. At evaluation and after loading, z = h * 1[h > theta] (a JumpReLU with one shared
threshold).

During training, the curve points need a threshold before that estimate exists: each training batch's
smallest kept value, averaged with an exponential moving average (`threshold_decay`, 0.99: about the last
100 batches), stands in until `finalize` replaces it; it is what checkpoints hold, so a resumed run goes
on with it. Before any training batch has set it, the per-vector TopK(k) is used.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from sae_core.architectures.base import LossOutput, SparseCode, StepContext, register
from sae_core.architectures.topk import TopK, TopKConfig
from sae_core.parallel.mesh import TRIVIAL, Mesh


class BatchTopKConfig(TopKConfig):
    arch: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]
    # training batches the inference threshold (eq. 8) is averaged over after training; the per-batch
    # minimum is an extreme quantile of B k kept values, so it varies little from batch to batch
    threshold_batches: int = Field(8, ge=1)
    threshold_decay: float = Field(0.99, ge=0, lt=1)  # the stand-in threshold of the curve points (docstring)


@register
class BatchTopK(TopK):
    name = "batchtopk"
    Config = BatchTopKConfig
    batch_select = True
    shardable = True

    def __init__(self, cfg: BatchTopKConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        # -1: not estimated yet. A buffer, so it is saved with the weights and in checkpoints.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor | SparseCode:
        if float(self.threshold) < 0:
            return self.encode_sparse(x)
        h = self.preactivation(x)
        return h * (h > self.threshold)

    def _smallest_kept(self, vals: torch.Tensor) -> torch.Tensor:
        """min{z_ij > 0} of a training batch's code: this process's kept values, the minimum over all
        processes (each takes part, kept or not); inf if nothing was kept."""
        kept = vals[vals > 0]
        smallest = kept.min() if kept.numel() else vals.new_tensor(float("inf"))
        return self.mesh.reduce_(smallest.reshape(1), "world", "min")[0]

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        out = super().loss(x, ctx)
        with torch.no_grad():
            smallest = self._smallest_kept(out.code.vals)
            if torch.isfinite(smallest):
                decay = self.cfg.threshold_decay if float(self.threshold) >= 0 else 0.0
                self.threshold.copy_(decay * self.threshold + (1 - decay) * smallest)
        out.terms["threshold"] = self.threshold.detach().clone()
        return out

    @torch.no_grad()
    def finalize(self, batches: Iterator[torch.Tensor]) -> bool:
        """theta = eq. 8 with the current weights: each batch's smallest value kept by the batch-level
        top-(B k) (the training selection, over all replicas' rows and all shards' latents), averaged."""
        minima = []
        for x in itertools.islice(batches, self.cfg.threshold_batches):
            vals, _, _, _ = self._select(x.to(self.W_enc.dtype), self.cfg.k, replica_rows=True)
            smallest = self._smallest_kept(vals)
            if torch.isfinite(smallest):
                minima.append(smallest.double())
        if not minima:  # nothing was ever kept (all pre-activations <= 0): keep the stand-in
            return False
        self.threshold.copy_(torch.stack(minima).mean().to(self.threshold.dtype))
        return True
