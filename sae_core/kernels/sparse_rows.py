"""The three sparse primitives a TopK SAE step needs, on a code given as (idx, w) of shape [B, k].

    rows_combine(idx, w, W)[b]      = sum_j w[b, j] * W[idx[b, j]]            -> [B, d]
    rows_dot(idx, G, W)[b, j]       = <G[b], W[idx[b, j]]>                    -> [B, k]
    rows_scatter(idx, w, X, n)[i]   = sum_{(b, j): idx[b, j] = i} w[b, j] X[b] -> [n, d], row-sparse

combine is the decoder forward and the encoder's input gradient; dot is the gradient of the code
values through the decoder; scatter is both weight gradients (Z^T X). Each costs O(B k d), against
O(B n d) for the dense equivalents. scatter returns a coalesced sparse COO tensor holding only the rows
that occur when fewer than half of them do: at n = 2^20 a dense [n, d] gradient would be 3 GiB per
weight, mostly zeros (optim.py applies Adam to it as to its dense equivalent); otherwise the dense
gradient, written in the same single pass. They are built from torch ops that have CPU and CUDA kernels
(embedding_bag, CSR sampled matmul, CSR x dense), measured fastest on CPU among the alternatives
(bench/train_step.py); index_add_ and gather+bmm were 3-10x slower here. On CUDA, with Triton installed,
the same three run as Triton kernels (triton_rows.py). entries_combine, entries_dot and entries_scatter are
combine, dot and scatter for entries given as flat (row, latent, value) lists: a dense family's active
entries (dense_code.py).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _triton(*tensors: torch.Tensor):
    """triton_rows where every tensor is on CUDA in a dtype its kernels take and Triton is installed."""
    if not all(t.is_cuda for t in tensors):
        return None
    try:
        from sae_core.kernels import triton_rows
    except ImportError:
        return None
    return triton_rows if tensors[-1].dtype in triton_rows.DTYPES else None


def rows_combine(idx: torch.Tensor, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    if (kernels := _triton(idx, W)) is not None:
        return kernels.rows_combine(idx, w, W)
    return F.embedding_bag(idx, W, per_sample_weights=w.to(W.dtype), mode="sum")


def _csr(crow, col, values, size) -> torch.Tensor:
    # Valid by construction, so skip the invariant checks; CSR is flagged beta, hence the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def rows_dot(idx: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    if (kernels := _triton(idx, G, W)) is not None:
        return kernels.rows_dot(idx, G, W)
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device, dtype=torch.int64)
    return _sampled_dot(crow, idx.reshape(-1), G, W).view(B, k)


def _sampled_dot(crow: torch.Tensor, col: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """<G[b], W[col[e]]> for every entry e of the CSR pattern (crow, col), row b holding it."""
    G = G.to(W.dtype)
    pattern = _csr(crow, col, torch.zeros(col.numel(), dtype=W.dtype, device=W.device), (G.shape[0], W.shape[0]))
    # sampled_addmm evaluates G @ W.T only at the pattern's nonzeros (SDDMM).
    return torch.sparse.sampled_addmm(pattern, G, W.t(), beta=0.0).values()


def rows_scatter(idx: torch.Tensor, w: torch.Tensor, X: torch.Tensor, n: int) -> torch.Tensor:
    B, k = idx.shape
    return entries_scatter(torch.arange(B, device=idx.device).repeat_interleave(k), idx.reshape(-1), w.reshape(-1),
                           X, n)


def entries_scatter(src: torch.Tensor, latents: torch.Tensor, w: torch.Tensor, X: torch.Tensor, n: int) -> torch.Tensor:
    """rows_scatter for entries given flat: out[i] = sum_{e: latents[e] = i} w[e] X[src[e]] -> [n, d]."""
    order = torch.argsort(latents)
    rows, counts = torch.unique_consecutive(latents[order], return_counts=True)
    # Row-sparse only where it saves: once half the rows occur (n <= 2 B k, n = 24576 at B = 4096 and
    # k = 32 has 99% of them), the optimizer and the decoder's gradient projection would densify and gather
    # it at more cost than writing the dense gradient here, empty rows zeroed in the same pass.
    dense = 2 * rows.numel() >= n
    out_rows = n if dense else rows.numel()
    crow = torch.zeros(out_rows + 1, dtype=torch.int64, device=latents.device)
    if dense:
        crow[rows + 1] = counts
        crow = crow.cumsum(0)
    else:
        crow[1:] = counts.cumsum(0)
    src, vals = src[order], w.to(X.dtype)[order]
    if (kernels := _triton(latents, X)) is not None:
        out = kernels.rows_gather_sum(crow, src, vals, X)
    else:
        out = _csr_product(crow, src, vals, X)
    if dense:
        return out
    return torch.sparse_coo_tensor(rows[None], out, (n, X.shape[1]), is_coalesced=True, check_invariants=False)


def entries_combine(rows: torch.Tensor, latents: torch.Tensor, w: torch.Tensor, W: torch.Tensor, B: int) -> torch.Tensor:
    """rows_combine for entries given flat and sorted by row (nonzero()'s order): out[b] = sum_{e: rows[e] = b}
    w[e] W[latents[e]] -> [B, d]."""
    return _csr_product(_row_starts(rows, B), latents, w.to(W.dtype), W)


def entries_dot(rows: torch.Tensor, latents: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """rows_dot for entries given flat and sorted by row: out[e] = <G[rows[e]], W[latents[e]]> -> [E]."""
    return _sampled_dot(_row_starts(rows, G.shape[0]), latents, G, W)


def _row_starts(rows: torch.Tensor, B: int) -> torch.Tensor:
    """CSR row pointers of entries sorted by row."""
    crow = torch.zeros(B + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return crow


def _csr_product(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The CSR matrix (crow, col, vals) times X. Written with beta 0 into uninitialised memory (empty rows
    too): `csr @ X` zero-fills its output and then copies it once more, two passes over the output that cost
    ~60% of the product itself on a CPU; out= spares the copy that addmm makes of its first argument."""
    out = X.new_empty(crow.numel() - 1, X.shape[1])
    return torch.addmm(out, _csr(crow, col, vals, (crow.numel() - 1, X.shape[0])), X, beta=0, out=out)
