"""Autograd functions of the sparse TopK path (Gao et al. 2024, appendix D.2).

The encoder forward is the one dense B x n operation: a matmul followed by top-k. Everything after it
works on (idx, vals) of shape [B, k]: the decoder forward, the gradient of the values, and both weight
gradients. The B x n pre-activation is freed at the end of forward; backward never rebuilds it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_core.kernels.sparse_rows import rows_combine, rows_dot, rows_scatter
from sae_core.kernels.topk_select import EXACT, Selection, aux_candidates, row_topk, select_topk
from sae_core.parallel.mesh import TRIVIAL, Mesh
from sae_core.parallel.sharded_topk import shard_candidates


def _batch_topk(pre: torch.Tensor, k: int, mesh: Mesh = TRIVIAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k*B entries of the whole batch (BatchTopK), laid out as rows padded with zeros to the widest row,
    so the per-row kernels serve it unchanged: a padded slot has value 0 and so no effect and no gradient.

    A top-k over all B*n entries costs 12x a per-row one (1.2 s at B=4096, n=24576 here). Instead: the
    (k*B)-th largest of each row's top 4k is a lower bound on the batch's cut (the candidates are a subset),
    so every kept entry is among those >= it; they are few, and the exact top k*B is taken among them.
    `pre` is non-negative (after ReLU); zeros are never kept, since they would be inactive anyway.
    Over a mesh the batch is every replica's rows and the latents every shard's: each process offers its best
    shard_candidates(k B) values of the k B winners (B the global batch), and the cut is the (k B)-th largest
    of all offers (exact while S <= capacity, as for TopK).
    """
    B, n = pre.shape
    m = k * B * mesh.replicas
    over = "world" if mesh.replicas > 1 else "shards"
    candidates = row_topk(pre, min(n, 4 * k)).values.flatten()
    offer = candidates.topk(min(shard_candidates(m, mesh, m), candidates.numel()), sorted=False).values
    if mesh.world > 1:  # processes' offers have one length: B and the candidates per row are the same on all
        gathered = mesh.gather(offer[None], over=over)[0]
        cut = gathered.topk(min(m, gathered.numel()), sorted=False).values.min()
    else:
        cut = offer.min()
    rows, cols = (pre >= cut if cut > 0 else pre > 0).nonzero(as_tuple=True)  # row-major: rows sorted
    vals = pre[rows, cols]
    if mesh.world > 1:  # the exact (k B)-th largest of what every process kept (padded to one length)
        most = int(mesh.reduce_(torch.tensor([vals.numel()], device=pre.device), over, "max"))
        kept = mesh.gather(torch.cat([vals, vals.new_full((most - vals.numel(),), -1.0)])[None], over=over)[0]
        if int((kept >= 0).sum()) > m:
            exact = kept.topk(m, sorted=False).values.min()
            keep = vals >= exact
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
    elif vals.numel() > m:  # rows with more than 4k entries above the bound, or ties at it
        vals, keep = vals.topk(m, sorted=False)
        keep = keep.sort().values  # back to row-major order
        rows, cols, vals = rows[keep], cols[keep], pre[rows[keep], cols[keep]]
    counts = torch.bincount(rows, minlength=B)
    pos = torch.arange(rows.numel(), device=pre.device) - (counts.cumsum(0) - counts)[rows]
    width = max(int(counts.max()), 1)
    idx = torch.zeros(B, width, dtype=torch.int64, device=pre.device).index_put_((rows, pos), cols)
    out = pre.new_zeros(B, width).index_put_((rows, pos), vals)
    return out, idx


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, aux_latents, k_aux, batch, selection, mesh):
        aux_k = k_aux if aux_latents is not None else 0
        if batch:  # the batch's cut needs every row at once: the full matrix, exact
            pre = F.linear(x, W_enc, b_enc)
            vals, idx = _batch_topk(pre.relu_(), k, mesh)  # AuxK reads the same rectified values, as ReLU follows
            aux = aux_candidates(pre, 0, aux_latents, aux_k) if aux_k else None
        else:
            # sorted: Multi-TopK reads the top-k as a prefix of the top-4k
            (vals, idx), aux = select_topk(x, W_enc, b_enc, k, aux_latents, aux_k, selection, sorted=True)
        vals = vals.to(W_enc.dtype).relu_()
        if aux is not None:
            aux_vals, aux_idx = aux[0].to(W_enc.dtype).relu_(), aux[1]
        else:
            aux_idx = idx.new_empty((x.shape[0], 0))
            aux_vals = vals.new_empty((x.shape[0], 0))
        ctx.save_for_backward(x, W_enc, idx, vals, aux_idx, aux_vals)
        ctx.has_bias = b_enc is not None
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x, W, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        n = W.shape[0]
        g_vals = torch.zeros_like(vals) if g_vals is None else g_vals
        I, G = idx, g_vals * (vals > 0)
        if aux_idx.shape[1] and g_aux is not None:
            I = torch.cat([I, aux_idx], dim=1)
            G = torch.cat([G, g_aux * (aux_vals > 0)], dim=1)
        G = G.to(W.dtype)
        grad_x = rows_combine(I, G, W).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_W = rows_scatter(I, G, x.to(W.dtype), n) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, dtype=W.dtype, device=W.device).index_add_(0, I.reshape(-1), G.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, vals, W_dec):
        ctx.save_for_backward(idx, vals, W_dec)
        return rows_combine(idx, vals, W_dec)

    @staticmethod
    def backward(ctx, g):
        idx, vals, W = ctx.saved_tensors
        g = g.to(W.dtype)
        grad_vals = rows_dot(idx, g, W).to(vals.dtype) if ctx.needs_input_grad[1] else None
        grad_W = rows_scatter(idx, vals, g, W.shape[0]) if ctx.needs_input_grad[2] else None
        return None, grad_vals, grad_W


def topk_encode(x, W_enc, b_enc, k: int, aux_latents: torch.Tensor | None = None, k_aux: int = 0,
                batch: bool = False, selection: Selection = EXACT, mesh: Mesh = TRIVIAL):
    """ReLU(TopK(x W_enc^T + b_enc)) as (vals, idx) [B, k], plus the AuxK code over `aux_latents`.

    `aux_latents` holds the indices of dead latents; the aux code is the top-`k_aux` of their
    pre-activations (k_aux <= len(aux_latents)). Without it the aux outputs have k = 0 columns.
    batch=True selects the top k*B of the whole batch instead (BatchTopK); rows are then padded.
    selection: how per-row winners are chosen (kernels/topk_select.py); their values are always exact.
    mesh: BatchTopK's cut over all latent shards (a per-row top-k is made global by the caller).
    """
    return _TopKEncode.apply(x, W_enc, b_enc, k, aux_latents, k_aux, batch, selection, mesh)


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * W_dec[idx[b, j]]: the decoder without its bias."""
    return _SparseDecode.apply(idx, vals, W_dec)
