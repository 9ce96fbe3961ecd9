"""Triton versions of the three sparse primitives (sparse_rows.py), used on CUDA when Triton is installed.

cuSPARSE's SDDMM and CSR x dense are general-purpose; here every sparse row has the same k entries (combine,
dot) or the entries come grouped (by row for combine, by latent for scatter: one gather-sum kernel serves
both), so one program per (row, d-block) reads each needed
weight row once, coalesced along d, and accumulates in fp32 (the reference implementation's kernels do
the same for the decoder forward and the weight gradients). They compute exactly what the torch ops
compute; tests run them through Triton's interpreter (TRITON_INTERPRET=1) on CPU against the torch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128
BLOCK_K = 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels load and store


@triton.jit
def _dot(idx_ptr, G_ptr, W_ptr, out_ptr, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < k
    rows = tl.load(idx_ptr + b * k + js, mask=j_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        g = tl.load(G_ptr + b * d + cols, mask=col_ok, other=0.0).to(tl.float32)
        tile = tl.load(W_ptr + rows[:, None] * d + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + b * k + js, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _gather_sum(crow_ptr, src_ptr, w_ptr, X_ptr, out_ptr, d, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    start = tl.load(crow_ptr + r)
    stop = tl.load(crow_ptr + r + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, stop, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < stop
        src = tl.load(src_ptr + es, mask=e_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
        tile = tl.load(X_ptr + src[:, None] * d + cols[None, :], mask=e_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + r * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def rows_combine(idx: torch.Tensor, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A gather-sum whose groups are the code's rows, k entries each: the scatter kernel serves it."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    return rows_gather_sum(crow, idx.reshape(-1), w.reshape(-1), W)


def rows_dot(idx: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    B, k = idx.shape
    d = W.shape[1]
    out = W.new_empty(B, k)
    _dot[(B, triton.cdiv(k, BLOCK_K))](idx.contiguous(), G.to(W.dtype).contiguous(), W.contiguous(), out, k, d,
                                       BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def rows_gather_sum(crow: torch.Tensor, src: torch.Tensor, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_{e in crow[r]:crow[r+1]} w[e] X[src[e]], accumulated in fp32 whatever the dtypes of w and X."""
    R, d = crow.numel() - 1, X.shape[1]
    out = X.new_empty(R, d)
    if R:
        _gather_sum[(R, triton.cdiv(d, BLOCK_D))](crow.contiguous(), src.contiguous(), w.contiguous(),
                                               X.contiguous(), out, d, BLOCK_E=BLOCK_K, BLOCK_D=BLOCK_D)
    return out
