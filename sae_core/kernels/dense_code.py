"""The dense families' code once training has made it sparse (ReLU, Gated, ProLU, JumpReLU).

Each of these thresholds a dense [B, n] pre-activation h, and after the sparsity penalty's warm-up few
entries pass: L0 ~ 50 of n = 24576 is 0.2%. In every one of them the code can be nonzero, and h's gradient
can be nonzero, only where h exceeds a per-latent bound (ReLU: 0; ProLU: max(0, -b); Gated: -b_gate;
JumpReLU: its threshold, less half the bandwidth where the threshold's pseudo-gradient still reads the
entries just below it). So once under SPARSE_DENSITY of h passes, a family's loss works on those entries
only, as flat (rows, latents) lists in row-major order (entries_above): the decoder and its weight gradient
(entries_combine / entries_scatter), the code's gradient (entries_dot: sampled at the entries rather than a
B x n x d product) and the encoder's weight gradient, which gather_entries hands back to centred_linear as a
sparse COO gradient of h, each cost O(nnz d). The one B x n x d product left in a step is the encoder's
forward, as in the TopK step (Gao et al. 2024, appendix D.2).

The density is judged on the first PROBE_ROWS rows (counting every entry is itself a pass over B x n), so
the choice costs nothing when it goes dense. CPU and fp32/fp64 only: on a GPU the dense product's rate puts
the crossover far lower (not measured), and the CPU's sparse kernels take no bf16.

decode_code is the decoder of a code given dense (encode's output), over its nonzeros when it is sparse.
"""
from __future__ import annotations

import torch

from sae_core.kernels.sparse_rows import entries_combine, entries_dot, entries_scatter

# Below this share of active entries the sparse path wins: ReLU at 768 x 24576, batch 4096 (bench/train_step.py
# --density: "relu sparse" against "relu dense") 0.85 against 3.1 s at 0.2%, 2.4-5.6 against 3.1 s at 1%, 5.0
# against 3.1 s at 3%
SPARSE_DENSITY = 0.01
PROBE_ROWS = 64


def _sparse_enough(t: torch.Tensor, test) -> bool:
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.dim() != 2:
        return False
    probe = t[:PROBE_ROWS]
    return int(torch.count_nonzero(test(probe))) < SPARSE_DENSITY * probe.numel()


def entries_above(h: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where h [B, n] exceeds the per-latent bound [n] (or a scalar), as (rows, latents) in row-major order,
    when that is sparse enough to pay; else None."""
    h, bound = h.detach(), bound.detach()
    if not _sparse_enough(h, lambda t: t > bound):
        return None
    return (h > bound).nonzero(as_tuple=True)


def nonzero_entries(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """t's nonzeros as (rows, latents, values) in row-major order when sparse enough to pay, else None."""
    if not _sparse_enough(t, lambda u: u):
        return None
    rows, latents = t.nonzero(as_tuple=True)
    return rows, latents, t[rows, latents]


class _GatherEntries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, rows, latents):
        ctx.save_for_backward(rows, latents)
        ctx.shape = h.shape
        return h[rows, latents]

    @staticmethod
    def backward(ctx, g):
        rows, latents = ctx.saved_tensors
        # h's gradient is zero off the entries: handed on sparse, it never becomes a B x n tensor
        grad = torch.sparse_coo_tensor(torch.stack([rows, latents]), g, ctx.shape, is_coalesced=True,
                                       check_invariants=False)
        return grad, None, None


def gather_entries(h: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """h[rows, latents] for distinct entries in row-major order; h's gradient comes back as a sparse COO tensor."""
    return _GatherEntries.apply(h, rows, latents)


class _DecodeEntries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, latents, vals, W, batch):
        ctx.save_for_backward(rows, latents, vals, W)
        return entries_combine(rows, latents, vals, W, batch)

    @staticmethod
    def backward(ctx, g):
        rows, latents, vals, W = ctx.saved_tensors
        g = g.to(W.dtype)
        grad_vals = entries_dot(rows, latents, g, W).to(vals.dtype) if ctx.needs_input_grad[2] else None
        grad_W = entries_scatter(rows, latents, vals, g, W.shape[0]) if ctx.needs_input_grad[3] else None
        return None, None, grad_vals, grad_W, None


def decode_entries(rows: torch.Tensor, latents: torch.Tensor, vals: torch.Tensor, W: torch.Tensor,
                   batch: int) -> torch.Tensor:
    """sum_{e: rows[e] = b} vals[e] W[latents[e]] -> [batch, d], entries sorted by row. W's gradient may come
    back row-sparse (sparse_rows.entries_scatter)."""
    return _DecodeEntries.apply(rows, latents, vals, W, batch)


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
