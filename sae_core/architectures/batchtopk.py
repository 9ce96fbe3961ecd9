"""BatchTopK SAE (Bussmann et al. 2024): TopK relaxed to the batch, with AuxK as in TopK.

Training keeps the top k*B entries of ReLU(W_enc (x - b_pre) + b_enc) over the whole batch of B vectors,
so L0 is k on average but varies per vector. Because that couples the vectors of a batch, inference
uses a global threshold instead, theta = E_X[min{z_ij(X) | z_ij(X) > 0}] (Leask et al. 2025, eq. 8):
each training batch's smallest kept activation, averaged with an exponential moving average
(`threshold_decay`, 0.99: about the last 100 batches, so early-training values are forgotten). At
evaluation and after loading, z = h * 1[h > theta] (a JumpReLU with one shared threshold); before
any training batch has set theta, the per-vector TopK(k) is used.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sae_core.architectures.base import LossOutput, SparseCode, StepContext, register
from sae_core.architectures.topk import TopK, TopKConfig
from sae_core.parallel.mesh import TRIVIAL, Mesh


class BatchTopKConfig(TopKConfig):
    arch: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]
    threshold_decay: float = Field(0.99, ge=0, lt=1)


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

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        out = super().loss(x, ctx)
        with torch.no_grad():
            kept = out.code.vals[out.code.vals > 0]
            # the smallest kept value of the whole batch over all shards (each takes part, kept or not)
            smallest = kept.min() if kept.numel() else out.code.vals.new_tensor(float("inf"))
            smallest = self.mesh.reduce_(smallest.reshape(1), "world", "min")[0]
            if torch.isfinite(smallest):
                decay = self.cfg.threshold_decay if float(self.threshold) >= 0 else 0.0
                self.threshold.copy_(decay * self.threshold + (1 - decay) * smallest)
        out.terms["threshold"] = self.threshold.detach().clone()
        return out
