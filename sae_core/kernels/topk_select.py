"""Which latents win the top-k, without holding the B x n pre-activations and from cheaper arithmetic.

A TopK step needs the exact values of the k winners only; the other n - k pre-activations serve just to
rank them. Two things follow:

- Streaming: the latents are taken in chunks of at most CHUNK_ENTRIES B x chunk pre-activations and a
  running top-m is kept per row, so memory is bounded whatever n is (n = 2^20 at B = 4096 would need
  16 GiB for the full matrix). One chunk when the whole matrix fits: then nothing changes.
- Cheaper ranking: with `Selection(dtype=torch.bfloat16)` the chunks are computed in bf16 (on this
  machine's AVX512-BF16 CPU 3.8x the fp32 matmul rate; tensor cores on GPUs), ceil(capacity * k)
  candidates are kept per row, their exact values recomputed in the parameters' dtype (rows_dot:
  B * capacity * k * d work instead of B * n * d) and the top k taken among them. The result differs
  from exact selection only where a true winner ranks below capacity * k in bf16; bench/peers.py
  reports the overlap of the chosen sets during training.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from sae_core.kernels.sparse_rows import rows_dot

CHUNK_ENTRIES = 2**28  # B x chunk pre-activations held at once (1 GiB in fp32)
_scratch = threading.local()


@dataclass(frozen=True)
class Selection:
    """How the winners are chosen: dtype None ranks in the parameters' own dtype (exact)."""

    dtype: torch.dtype | None = None
    capacity: float = 2.0  # candidates per winner kept from the low-precision ranking


EXACT = Selection()


@cache
def _cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX) and oneDNN may use it: ONEDNN_MAX_CPU_ISA can
    cap oneDNN below those instructions, and then its bf16 matmul is emulated (bench/machine.py --isa avx2)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: do not assume
        return False
    if not ("avx512_bf16" in flags or "amx_bf16" in flags):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# On a CPU, bf16 ranking pays from this many rows per step: it makes a bf16 copy of W_enc at every step
# (n x d, whatever the batch), which costs what the cheaper matmul saves at 1024 rows (n 24576: 0.253 s
# either way; n 98304: 0.906 s against 0.778 exact) and far less at 4096 (0.459 against 0.686, 1.44 against
# 2.40): bench/peers.py, Intel Xeon with AMX
BF16_MIN_ROWS_CPU = 2048


def resolve_selection(mode: str, capacity: float, device: torch.device, rows: int) -> Selection:
    """`train.topk_select`: exact, bf16, or auto = bf16 where the hardware multiplies bf16 natively (CUDA
    with bf16 support; CPUs with AVX512-BF16 or AMX at BF16_MIN_ROWS_CPU or more rows per step), exact
    elsewhere, where bf16 would be emulated or not pay. rows: the batch rows each step encodes."""
    if mode == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                  else _cpu_has_native_bf16() and rows >= BF16_MIN_ROWS_CPU)
        mode = "bf16" if native else "exact"
    return Selection(torch.bfloat16, capacity) if mode == "bf16" else EXACT


CANDIDATES = 1024  # entries per row that row_topk's second pass ranks (GROUP = CANDIDATES // m, at least 8)


def row_topk(t: torch.Tensor, m: int, sorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """t.topk(m, dim=-1): the same values per row (indices may differ among tied values), on a CPU in two
    cheap passes instead of a selection over every entry. Split each row into G = n // GROUP groups of
    GROUP entries (strided: group g holds columns g, g + G, g + 2G, ..., so that the maxima are an
    element-wise max over GROUP contiguous [G] slices). The m largest group maxima are m distinct entries,
    so the row's m-th largest value is at least the smallest of them, and every top-m entry lies in a group
    whose maximum is among the m largest: the top m of those m groups (and of the n mod GROUP columns left
    over) is the row's. torch.topk elsewhere: on GPUs, in bf16 (whose CPU element-wise max is no cheaper
    than its topk) and for rows too short for the groups to pay. bench/topk_rows.py times it."""
    B, n = t.shape
    group = max(8, CANDIDATES // m)
    G = n // group
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or G < 4 * m:
        return t.topk(m, dim=-1, sorted=sorted)
    groups = t[:, : G * group].view(B, group, G)
    top_groups = groups.amax(dim=1).topk(m, dim=-1, sorted=False).indices  # [B, m]
    cand = groups.gather(2, top_groups[:, None, :].expand(B, group, m)).reshape(B, group * m)
    if n > G * group:  # the columns left over are candidates too
        cand = torch.cat([cand, t[:, G * group:]], dim=1)
    vals, pos = cand.topk(m, dim=-1, sorted=sorted)
    # candidate p < group * m is column top_groups[p % m] + G * (p // m); past them, the columns left over
    in_groups = top_groups.gather(1, pos.remainder(m)) + G * pos.div(m, rounding_mode="floor")
    return vals, torch.where(pos < group * m, in_groups, pos + (G * group - group * m))


def _keep_top(best, vals, idx, m):
    """Merge a chunk's candidates into the running top-m of each row."""
    if best is not None:
        vals, idx = torch.cat([best[0], vals], dim=1), torch.cat([best[1], idx], dim=1)
        if vals.shape[1] > m:
            vals, pos = vals.topk(m, dim=-1, sorted=False)
            idx = idx.gather(1, pos)
    return vals, idx


def aux_candidates(pre: torch.Tensor, start: int, among: torch.Tensor, m: int):
    """Top-m of `pre` (the columns start.. of the pre-activations) restricted to the sorted latents `among`;
    None if none of them lies in this chunk."""
    lo, hi = torch.searchsorted(among, torch.tensor([start, start + pre.shape[1]], device=among.device)).tolist()
    if hi == lo:
        return None
    local = among[lo:hi]
    vals, pos = pre.index_select(1, local - start).topk(min(m, hi - lo), dim=-1, sorted=False)
    return vals, local[pos]


def _with_bias_column(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[x, 1, 0...] in the ranking dtype, padded to a multiple of 16 columns: the bias then rides in the
    matmul instead of being broadcast into the B x n output first (a full extra pass over it)."""
    d = x.shape[1]
    out = x.new_zeros((x.shape[0], -(-(d + 1) // 16) * 16), dtype=dtype)
    out[:, :d] = x
    out[:, d] = 1
    return out


def _ranking_weights(W: torch.Tensor, b: torch.Tensor | None, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[W, b, 0...]^T in the ranking dtype, stored [width, n]: the layout the CPU GEMM reads fastest
    (0.27 s against 0.35 s for W^T as a view at B = 4096, n = 24576 here)."""
    d = W.shape[1]
    out = W.new_zeros((width, W.shape[0]), dtype=dtype)
    out[:d] = W.t()
    if b is not None:
        out[d] = b
    return out


def _chunk_buffer(B: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A CPU buffer for one chunk's pre-activations, kept by the thread between calls. glibc hands blocks this
    large back to the OS when freed, so a fresh [B, chunk] output is page-faulted in again at every step:
    4-7% of the encoder forward at B = 4096, n = 24576 here. None on other devices, whose caching allocators
    already reuse memory, and under autocast, which takes no out= argument. At most CHUNK_ENTRIES entries."""
    if device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.dtype != dtype or buf.numel() < B * width:
        buf = _scratch.buffer = None  # the old one freed before the new one is taken
        buf = _scratch.buffer = torch.empty(B * width, dtype=dtype)
    return buf[: B * width].view(B, width)


def _preactivations(x, W, b, out):
    """x W^T + b, into `out` when given."""
    if out is None:
        return F.linear(x, W, b)
    return torch.mm(x, W.t(), out=out) if b is None else torch.addmm(b, x, W.t(), out=out)


def _exact_top(x, W, b, idx, k, sorted):
    vals = rows_dot(idx, x, W)
    if b is not None:
        vals = vals + b[idx]
    vals, pos = vals.topk(k, dim=-1, sorted=sorted)
    return vals, idx.gather(1, pos)


def select_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, k: int,
                among: torch.Tensor | None = None, k_among: int = 0, selection: Selection = EXACT,
                sorted: bool = True):
    """Top-k of x W^T + b per row as (vals, idx) [B, k], and the top-k_among restricted to the sorted
    latent indices `among` (AuxK's dead latents) as (vals, idx) [B, k_among] or None.
    Values are the pre-activations in W's dtype (or autocast's); sorted orders the main top-k descending."""
    B, n = x.shape[0], W.shape[0]
    cheap = selection.dtype is not None and selection.dtype != W.dtype
    m = min(n, math.ceil(selection.capacity * k)) if cheap else k
    m_aux = min(n, math.ceil(selection.capacity * k_among)) if cheap else k_among
    xs = _with_bias_column(x, selection.dtype) if cheap else x
    chunk = max(1, CHUNK_ENTRIES // max(B, 1))
    one_pass = not cheap and n <= chunk  # the values topk returns are final
    best = aux = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        bc = b[start:stop] if b is not None else None
        out = _chunk_buffer(B, stop - start, selection.dtype if cheap else W.dtype, x.device)
        if cheap:
            pre = torch.mm(xs, _ranking_weights(W[start:stop], bc, xs.shape[1], selection.dtype), out=out)
        else:
            pre = _preactivations(x, W[start:stop], bc, out)
        vals, idx = row_topk(pre, min(m, stop - start), sorted=sorted and one_pass)
        best = _keep_top(best, vals, idx + start, m)
        if among is not None and k_among:
            found = aux_candidates(pre, start, among, m_aux)
            if found is not None:
                aux = _keep_top(aux, *found, m_aux)
        del pre
    if cheap:
        best = _exact_top(x, W, b, best[1], k, sorted)
        aux = _exact_top(x, W, b, aux[1], k_among, False) if aux is not None else None
    elif sorted and not one_pass:
        vals, order = best[0].sort(dim=-1, descending=True)
        best = vals, best[1].gather(1, order)
    return best, aux
