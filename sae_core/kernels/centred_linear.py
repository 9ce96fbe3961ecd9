"""The dense families' encoder matmul, (x - b_pre) W^T + b, with the backward it needs.

The input batch x needs no gradient; b_pre does, and autograd would get it by forming the [B, d] gradient
of x - b_pre (a B x n x d matmul, a third of the encoder's work and a sixth of a dense step's) only to sum
it over the batch. The sum comes first here: b_pre's gradient is -(sum_b g_b) W, a vector times W.
When g comes sparse (a trained code's active entries: dense_code.py), W's gradient g^T (x - b_pre) and the
column sums run over its entries only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_core.kernels.sparse_rows import entries_combine, entries_scatter


class _CentredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_pre, W, b):
        xc = x - b_pre
        ctx.save_for_backward(xc, W)
        ctx.has_bias = b is not None
        return F.linear(xc, W, b)

    @staticmethod
    def backward(ctx, g):
        xc, W = ctx.saved_tensors
        # in g's dtype, as autograd would under autocast (the forward's matmul ran in it); grads in the inputs'
        Wg = W.to(g.dtype)
        need_x, need_b_pre, need_W, need_b = ctx.needs_input_grad
        if g.is_sparse:
            g = g.coalesce()  # row-major without repeats, as entries_combine takes them
            (rows, latents), vals = g.indices(), g.values()
            g_rows = entries_combine(rows, latents, vals, Wg, g.shape[0]) if need_x else None
            colsum = vals.new_zeros(g.shape[1]).index_add_(0, latents, vals)
            grad_W = entries_scatter(rows, latents, vals, xc.to(g.dtype), W.shape[0]) if need_W else None
        else:
            g_rows = g @ Wg if need_x else None
            colsum = g.sum(0)
            grad_W = (g.t() @ xc.to(g.dtype)).to(W.dtype) if need_W else None
        grad_b_pre = -(colsum @ Wg).to(xc.dtype) if need_b_pre else None
        grad_b = colsum.to(W.dtype) if need_b and ctx.has_bias else None
        return g_rows, grad_b_pre, grad_W, grad_b


def centred_linear(x: torch.Tensor, b_pre: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(x - b_pre) W^T + b for x [B, d], W [n, d]: F.linear's values and gradients, one matmul fewer. W's
    gradient may come back row-sparse (sparse_rows.entries_scatter)."""
    return _CentredLinear.apply(x, b_pre, W, b)
