"""Streamed and low-precision top-k selection against the full float64 pre-activations."""
import os
import subprocess
import sys

import pytest
import torch

from sae_core import Trainer, optim
from sae_core.kernels import EXACT, Selection, resolve_selection, topk_encode, topk_select
from sae_core.kernels.topk_select import select_topk
from sae_core.sources.synthetic import SyntheticSource

B, D, N, K = 41, 24, 300, 7


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sets(idx):
    return idx.sort(dim=1).values


def _overlap(a, b):
    hits = sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b))
    return hits / a.numel()


@pytest.mark.parametrize("chunk_latents", [17, 1000])  # 18 chunks, and one
def test_streamed_exact_selection_equals_full_topk(monkeypatch, chunk_latents):
    monkeypatch.setattr(topk_select, "CHUNK_ENTRIES", B * chunk_latents)
    x, W, b = _rand(B, D, seed=0), _rand(N, D, seed=1), _rand(N, seed=2)
    dead = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:50].sort().values
    (vals, idx), (avals, aidx) = select_topk(x, W, b, K, dead, 5)
    pre = x @ W.T + b
    ref_vals, ref_idx = pre.topk(K, dim=-1)  # sorted descending
    torch.testing.assert_close(vals, ref_vals, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx, ref_idx)
    masked = torch.full_like(pre, float("-inf"))
    masked[:, dead] = pre[:, dead]
    ref_avals, ref_aidx = masked.topk(5, dim=-1)
    assert torch.equal(_sets(aidx), _sets(ref_aidx))
    torch.testing.assert_close(avals.sort(dim=1).values, ref_avals.sort(dim=1).values, rtol=1e-12, atol=1e-12)


def test_bf16_selection_with_every_candidate_is_exact():
    x, W, b = _rand(B, D, seed=4), _rand(N, D, seed=5), _rand(N, seed=6)
    every = Selection(torch.bfloat16, capacity=N / K)
    (vals, idx), _ = select_topk(x, W, b, K, selection=every)
    ref_vals, ref_idx = (x @ W.T + b).topk(K, dim=-1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_latents", [23, 1000])
def test_bf16_selection_values_are_exact_and_sets_nearly_equal(monkeypatch, chunk_latents):
    monkeypatch.setattr(topk_select, "CHUNK_ENTRIES", 400 * chunk_latents)
    x, W, b = _rand(400, D, seed=7), _rand(N, D, seed=8), _rand(N, seed=9)
    dead = torch.arange(0, N, 3)
    (vals, idx), (avals, aidx) = select_topk(x, W, b, K, dead, 4, Selection(torch.bfloat16, 2.0))
    pre = x @ W.T + b
    # whatever was chosen carries its exact float64 pre-activation, in descending order
    torch.testing.assert_close(vals, pre.gather(1, idx), rtol=1e-12, atol=1e-12)
    assert (vals.diff(dim=1) <= 0).all()
    torch.testing.assert_close(avals, pre.gather(1, aidx), rtol=1e-12, atol=1e-12)
    assert torch.isin(aidx, dead).all()
    assert _overlap(idx, pre.topk(K, dim=-1).indices) > 0.99
    assert _overlap(aidx, pre[:, dead].topk(4, dim=-1).indices.apply_(lambda i: int(dead[i]))) > 0.99


def test_gradients_through_bf16_selection_equal_exact_when_sets_agree():
    x, W, b = _rand(B, D, seed=10), _rand(N, D, seed=11), _rand(N, seed=12)
    grads = []
    for selection in (EXACT, Selection(torch.bfloat16, capacity=N / K)):
        leaves = [t.clone().requires_grad_() for t in (x, W, b)]
        vals, idx, _, _ = topk_encode(*leaves, K, selection=selection)
        (vals * torch.linspace(-1, 2, K, dtype=torch.float64)).sum().backward()
        grads.append([t.grad.to_dense() if t.grad.is_sparse else t.grad for t in leaves])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_resolve_selection():
    cpu = torch.device("cpu")
    assert resolve_selection("exact", 2.0, cpu, 4096) == EXACT
    assert resolve_selection("bf16", 3.0, cpu, 64) == Selection(torch.bfloat16, 3.0)
    flags = open("/proc/cpuinfo").read()
    native = ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    many = topk_select.BF16_MIN_ROWS_CPU
    assert resolve_selection("auto", 2.0, cpu, many) == (Selection(torch.bfloat16, 2.0) if native else EXACT)
    # below it the per-step bf16 copy of W_enc costs what the cheaper matmul saves: exact
    assert resolve_selection("auto", 2.0, cpu, many - 1) == EXACT


def test_streamed_encoder_and_row_blocked_adam_train_like_the_one_pass_path(monkeypatch):
    """n large against B*k, so most gradient rows are absent and the blocked optimizer path runs."""
    src = SyntheticSource(d_in=16, n_features=64, seed=0)
    sae = {"arch": "topk", "d_in": 16, "n_latents": 2048, "k": 4}
    train = {"train_tokens": 32 * 5, "batch_size": 32, "init_samples": 64, "topk_select": "exact",
             "dead_window_tokens": 64}  # latents die early, so AuxK runs too
    weights = []
    for chunked in (False, True):
        if chunked:
            monkeypatch.setattr(topk_select, "CHUNK_ENTRIES", 32 * 100)
            monkeypatch.setattr(optim, "ROW_BLOCK_ENTRIES", 16 * 150)
        result = Trainer(sae, train, src).run()
        weights.append({k: v.detach().clone() for k, v in result.sae.net.state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_auto_ranks_exactly_where_onednn_is_capped_below_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 (bench/machine.py --isa avx2) makes oneDNN's bf16 matmul emulated, many times
    slower than fp32 even on a CPU with AVX512-BF16: auto must then rank exactly."""
    code = ("import torch; from sae_core.kernels.topk_select import resolve_selection, EXACT; "
            "print(resolve_selection('auto', 2.0, torch.device('cpu'), 4096) == EXACT)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.stdout.strip() == "True"


def test_the_reused_chunk_buffer_leaves_earlier_results_intact():
    """select_topk writes each chunk into one buffer the thread keeps: a later call (other shapes, other
    dtype) must not change what an earlier one returned, and each must equal the float64 top-k."""
    g = torch.Generator().manual_seed(5)
    W, b = torch.randn(300, 16, generator=g), torch.randn(300, generator=g)
    results = []
    for rows, selection in ((40, EXACT), (7, Selection(torch.bfloat16, 300 / 5)), (90, EXACT)):
        x = torch.randn(rows, 16, generator=g)
        (vals, idx), _ = select_topk(x, W, b, 5, selection=selection)
        results.append((x, vals, idx))
    for x, vals, idx in results:
        ref = (x.double() @ W.double().T + b.double()).topk(5, dim=-1)
        assert torch.equal(idx, ref.indices)
        torch.testing.assert_close(vals.double(), ref.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", [(24576, 32), (3000, 7), (5003, 64), (1000, 32), (200, 8)])
@pytest.mark.parametrize("ties", [False, True])
def test_row_topk_gives_topks_values_at_the_indices_it_returns(dtype, n, m, ties):
    """row_topk's grouped two-pass selection against torch.topk: the same multiset of values per row (sorted
    when asked), distinct indices that hold them; rows whose n is not a multiple of the group, rows with many
    tied values, and rows too short for the groups (the plain topk path)."""
    g = torch.Generator().manual_seed(n + m)
    t = torch.randn(64, n, generator=g, dtype=dtype) + 0.5 * torch.randn(1, n, generator=g, dtype=dtype)
    if ties:
        t = (t * 2).round()  # a handful of distinct values: ties cross the group boundaries
    t[3, -1] = 50.0  # a winner in the columns left over past the groups
    for sorted_ in (False, True):
        vals, idx = topk_select.row_topk(t, m, sorted=sorted_)
        ref = t.topk(m, dim=-1).values
        torch.testing.assert_close(vals if sorted_ else vals.sort(dim=-1, descending=True).values, ref,
                                   rtol=0, atol=0)
        assert torch.equal(t.gather(1, idx), vals)
        assert (idx.sort(dim=-1).values.diff(dim=-1) > 0).all()  # distinct latents per row
    assert 50.0 in vals[3]
