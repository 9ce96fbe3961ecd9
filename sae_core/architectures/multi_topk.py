"""Multi-TopK (Gao et al. 2024, section 5.3.1): L(k) + multi_coeff * L(multi_k_factor * k).

Defaults multi_k_factor = 4, multi_coeff = 1/8: the paper's L(k) + L(4k)/8, "enough to obtain a
progressive code over all k'". Inference (and L0) uses TopK(k); the AuxK settings are TopK's.
One forward selects the top 4k latents; the top k are its prefix, so both codes come from one top-k.
Training this way makes the code progressive: TopK(k') at test time keeps improving past k.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from sae_core.architectures.base import SparseCode, StepContext, fvu_loss, register
from sae_core.architectures.topk import TopK, TopKConfig
from sae_core.parallel.sharded_topk import keep_global_topk


class MultiTopKConfig(TopKConfig):
    arch: Literal["multi_topk"] = "multi_topk"  # type: ignore[assignment]
    multi_k_factor: int = Field(4, ge=2, validate_default=True)  # the second loss term's k is this times k
    multi_coeff: float = Field(1 / 8, ge=0, allow_inf_nan=False)  # its weight: the paper's L(k) + L(4k)/8

    @field_validator("multi_k_factor")
    @classmethod
    def _large_k_fits(cls, factor: int, info: ValidationInfo) -> int:
        k, n = info.data.get("k"), info.data.get("n_latents")
        if k is not None and n is not None and k * factor > n:
            raise ValueError(f"k * multi_k_factor = {k * factor} must be <= n_latents ({n}); "
                             f"allowed: multi_k_factor <= {n // k}")
        return factor

    @property
    def encode_k(self) -> int:
        return self.k * self.multi_k_factor


@register
class MultiTopK(TopK):
    name = "multi_topk"
    Config = MultiTopKConfig
    shardable = True

    def reconstruction_loss(self, x, code: SparseCode, ctx: StepContext, terms: dict):
        k = self.cfg.k
        if self.mesh.shards == 1:  # the wide code is sorted: its prefix is TopK(k)
            top_k = SparseCode(code.idx[:, :k], code.vals[:, :k])
        else:  # the global top k of the global top 4k, among this shard's entries
            top_k = SparseCode(code.idx, code.vals * keep_global_topk(code.vals, k, self.mesh))
        x_hat = self.decode(top_k)
        main = fvu_loss(x, x_hat, ctx.mse_scale)
        wide = fvu_loss(x, self.decode(code), ctx.mse_scale)
        terms["mse_loss"], terms["multi_mse_loss"] = main.detach(), wide.detach()
        return main + self.cfg.multi_coeff * wide, top_k, x_hat, [k, self.cfg.encode_k]
