"""The three sparse primitives a TopK SAE step needs, on a code given as (idx, w) of shape [B, k].

    rows_combine(idx, w, W)[b]      = sum_j w[b, j] * W[idx[b, j]]            -> [B, d]
    rows_dot(idx, G, W)[b, j]       = <G[b], W[idx[b, j]]>                    -> [B, k]
    rows_scatter(idx, w, X, n)[i]   = sum_{(b, j): idx[b, j] = i} w[b, j] X[b] -> [n, d], row-sparse

combine is the decoder forward and the encoder's input gradient; dot is the gradient of the code
values through the decoder; scatter is both weight gradients (Z^T X). Each costs O(B k d), against
O(B n d) for the dense equivalents. scatter returns a coalesced sparse COO tensor holding only the rows
that occur: at n = 2^20 a dense [n, d] gradient would be 3 GiB per weight, mostly zeros (optim.py
applies Adam to it as to its dense equivalent). They are built from torch ops that have CPU and CUDA kernels
(embedding_bag, CSR sampled matmul, CSR x dense), measured fastest on CPU among the alternatives
(bench/train_step.py); index_add_ and gather+bmm were 3-10x slower here. On CUDA, with Triton installed,
the same three run as Triton kernels (triton_rows.py).
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


def _row_major_csr(idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] CSR matrix with row b holding values[b, :] at columns idx[b, :]."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device, dtype=torch.int64)
    return _csr(crow, idx.reshape(-1), values.reshape(-1), (B, n))


def rows_dot(idx: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    if (kernels := _triton(idx, G, W)) is not None:
        return kernels.rows_dot(idx, G, W)
    B, k = idx.shape
    G = G.to(W.dtype)
    pattern = _row_major_csr(idx, torch.zeros(B * k, dtype=W.dtype, device=W.device), W.shape[0])
    # sampled_addmm evaluates G @ W.T only at the pattern's nonzeros (SDDMM).
    return torch.sparse.sampled_addmm(pattern, G, W.t(), beta=0.0).values().view(B, k)


def rows_scatter(idx: torch.Tensor, w: torch.Tensor, X: torch.Tensor, n: int) -> torch.Tensor:
    B, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat)
    rows, counts = torch.unique_consecutive(flat[order], return_counts=True)
    crow = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = counts.cumsum(0)
    src = torch.arange(B, device=idx.device).repeat_interleave(k)[order]
    vals = w.reshape(-1).to(X.dtype)[order]
    if (kernels := _triton(idx, X)) is not None:
        out = kernels.rows_gather_sum(crow, src, vals, X)
    else:
        # beta 0: the product is written into uninitialised memory; `csr @ X` zero-fills its output and then
        # copies it once more, two passes over rows x d that cost ~60% of the product itself on a CPU
        out = torch.addmm(X.new_empty(rows.numel(), X.shape[1]), _csr(crow, src, vals, (rows.numel(), B)), X, beta=0)
    return torch.sparse_coo_tensor(rows[None], out, (n, X.shape[1]), is_coalesced=True, check_invariants=False)
