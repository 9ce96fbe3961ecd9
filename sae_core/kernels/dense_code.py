"""The dense families' products with a code that is mostly zeros once trained (ReLU, Gated, ProLU, JumpReLU).

Their code z = f(pre) is a dense [B, n] tensor, but after the L1 (or L0) penalty's warm-up few entries are
nonzero: L0 ~ 50 of n = 24576 is 0.2%. Two of a dense step's five B x n x d matmuls then multiply mostly
zeros: the decoder z W_dec, and W_dec's gradient z^T g. A third, W_enc's gradient g_pre^T (x - b_pre), does
too, since every family's g_pre vanishes where the latent is inactive. Below SPARSE_DENSITY nonzeros those
run over the nonzeros only (O(nnz d), entries_combine / entries_scatter); the code's gradient g W_dec^T stays
dense, since some activations pass gradient to inactive entries (JumpReLU's threshold, the gated aux path).

The density is judged on the first PROBE_ROWS rows (counting every entry is itself a pass over B x n), so
the choice costs nothing when it goes dense. CPU and fp32/fp64 only: on a GPU the dense product's rate puts
the crossover far lower (not measured), and the CPU's sparse kernels take no bf16.
"""
from __future__ import annotations

import torch

from sae_core.kernels.sparse_rows import entries_combine, entries_scatter

# Below this share of nonzeros the sparse products win (bench/train_step.py --density, 768 x 24576, B 4096)
SPARSE_DENSITY = 0.01
PROBE_ROWS = 64


def nonzero_entries(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """t's nonzeros as (rows, latents, values) in row-major order when sparse enough to pay, else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.dim() != 2:
        return None
    probe = t[:PROBE_ROWS]
    if int(torch.count_nonzero(probe)) >= SPARSE_DENSITY * probe.numel():
        return None
    rows, latents = t.nonzero(as_tuple=True)
    return rows, latents, t[rows, latents]


class _DecodeCode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, W):
        entries = nonzero_entries(z) if z.dtype == W.dtype else None
        ctx.sparse = entries is not None
        ctx.save_for_backward(W, *(entries if ctx.sparse else (z,)))
        return entries_combine(*entries, W, z.shape[0]) if ctx.sparse else z @ W

    @staticmethod
    def backward(ctx, g):
        W, *code = ctx.saved_tensors
        g = g.to(W.dtype)
        grad_z = (g @ W.t()).to(code[-1].dtype) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = entries_scatter(*code, g, W.shape[0]) if ctx.sparse else code[0].t().to(W.dtype) @ g
        return grad_z, grad_W


def decode_code(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """z W for a code z [B, n] and decoder W [n, d]: the matmul's values and gradients, over z's nonzeros
    when it is sparse. W's gradient may come back row-sparse (sparse_rows.entries_scatter)."""
    return _DecodeCode.apply(z, W)
