"""The sparse TopK path against a dense float64 reference: values and every gradient."""
import pytest
import torch

from sae_core.kernels import rows_combine, rows_dot, rows_scatter, sparse_decode, topk_encode

B, D, N, K = 37, 24, 300, 7


def _dense(g):
    return g.to_dense() if g.is_sparse else g


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [N, 10 * N])
def test_primitives_match_dense(n):
    idx = torch.randint(0, n, (B, K), generator=torch.Generator().manual_seed(0))
    w, W, G = _rand(B, K, seed=1), _rand(n, D, seed=2), _rand(B, D, seed=3)
    Z = torch.zeros(B, n, dtype=torch.float64).index_put_((torch.arange(B)[:, None].expand(B, K), idx), w, accumulate=True)
    torch.testing.assert_close(rows_combine(idx, w, W), Z @ W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows_dot(idx, G, W), (G @ W.T).gather(1, idx), rtol=1e-12, atol=1e-12)
    scattered = rows_scatter(idx, w, G, n)
    if 2 * idx.unique().numel() >= n:  # most rows occur: dense, the empty rows written as exact zeros
        assert not scattered.is_sparse
        assert not scattered[torch.ones(n, dtype=torch.bool).index_fill_(0, idx.unique(), False)].any()
    else:  # row-sparse: exactly the rows that occur, coalesced
        assert scattered.is_sparse and scattered.is_coalesced()
        assert torch.equal(scattered.indices()[0], idx.unique())
    torch.testing.assert_close(_dense(scattered), Z.T @ G, rtol=1e-12, atol=1e-12)


def _dense_reference(x, W_enc, b_enc, W_dec, b_pre, k, dead, k_aux, multi):
    """Everything dense in float64, autograd through scatter: the obvious implementation."""
    pre = (x - b_pre) @ W_enc.T + (b_enc if b_enc is not None else 0)
    kk = 4 * k if multi else k
    top = pre.topk(kk, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
    zk = torch.zeros_like(pre).scatter(1, top[:, :k], pre.gather(1, top[:, :k])).relu()
    xh = zk @ W_dec + b_pre
    loss = ((x - xh) ** 2).sum()
    if multi:
        loss = loss + ((x - (z @ W_dec + b_pre)) ** 2).sum() / 8
    if dead is not None:
        masked = pre.masked_fill(~dead, float("-inf"))
        at = masked.topk(k_aux, dim=-1).indices
        za = torch.zeros_like(pre).scatter(1, at, pre.gather(1, at)).relu()
        e = (x - xh).detach()
        loss = loss + ((e - za @ W_dec) ** 2).sum()
    return loss


def _sparse(x, W_enc, b_enc, W_dec, b_pre, k, dead, k_aux, multi):
    kk = 4 * k if multi else k
    aux = dead.nonzero().squeeze(1) if dead is not None else None
    vals, idx, avals, aidx = topk_encode(x - b_pre, W_enc, b_enc, kk, aux, k_aux)
    xh = sparse_decode(idx[:, :k], vals[:, :k], W_dec) + b_pre
    loss = ((x - xh) ** 2).sum()
    if multi:
        loss = loss + ((x - (sparse_decode(idx, vals, W_dec) + b_pre)) ** 2).sum() / 8
    if dead is not None:
        e = (x - xh).detach()
        loss = loss + ((e - sparse_decode(aidx, avals, W_dec)) ** 2).sum()
    return loss


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("multi", [False, True])
def test_sparse_path_values_and_grads_match_dense_float64(bias, aux, multi):
    params = dict(
        x=_rand(B, D, seed=10),
        W_enc=_rand(N, D, seed=11),
        b_enc=_rand(N, seed=12) if bias else None,
        W_dec=_rand(N, D, seed=13),
        b_pre=_rand(D, seed=14),
    )
    dead = None
    if aux:
        dead = torch.zeros(N, dtype=torch.bool)
        dead[torch.randperm(N, generator=torch.Generator().manual_seed(5))[:40]] = True
    results = []
    for fn in (_dense_reference, _sparse):
        leaves = {name: p.clone().requires_grad_() if p is not None else None for name, p in params.items()}
        loss = fn(**leaves, k=K, dead=dead, k_aux=16, multi=multi)
        loss.backward()
        results.append((loss.detach(), {n: _dense(p.grad) for n, p in leaves.items() if p is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-9, msg=name)


def test_float32_matches_float64_reference_closely():
    x, W = torch.randn(64, 16), torch.randn(200, 16)
    vals, idx, _, _ = topk_encode(x, W, None, 5)
    ref = (x.double() @ W.double().T).topk(5).values.relu()
    torch.testing.assert_close(vals.double(), ref, rtol=1e-5, atol=1e-5)


def test_batch_topk_keeps_exactly_k_times_b_and_matches_dense_grads():
    x, W, b = _rand(B, D, seed=20), _rand(N, D, seed=21), _rand(N, seed=22)
    W_dec = _rand(N, D, seed=23)
    results = []
    for sparse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, W_dec)]
        xl, Wl, bl, Dl = leaves
        if sparse:
            vals, idx, _, _ = topk_encode(xl, Wl, bl, K, batch=True)
            assert int((vals > 0).sum()) == K * B  # random data: every kept value is positive
            out = sparse_decode(idx, vals, Dl)
        else:
            pre = (xl @ Wl.T + bl).relu()
            keep = pre.flatten().topk(K * B).indices
            mask = torch.zeros(B * N, dtype=torch.bool)
            mask[keep] = True
            out = (pre * mask.view(B, N)) @ Dl
        (out ** 2).sum().backward()
        results.append((out.detach(), [_dense(t.grad) for t in leaves]))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


def test_batch_topk_candidate_bound_is_exact_including_a_dominant_row():
    from sae_core.kernels.topk_autograd import _batch_topk
    pre = torch.randn(64, 500, generator=torch.Generator().manual_seed(3)).relu()
    for case in ("spread", "one row dominates"):
        if case == "one row dominates":
            # row 7 holds far more than 4k of the batch's top k*B (distinct values: no ties to break)
            pre[7] = 100.0 + torch.rand(500, generator=torch.Generator().manual_seed(4))
        vals, idx = _batch_topk(pre, 4)
        got = torch.zeros_like(pre).index_put_((torch.arange(64)[:, None].expand_as(idx), idx), vals, accumulate=True)
        keep = pre.flatten().topk(4 * 64).indices
        ref = torch.zeros(64 * 500).index_put_((keep,), pre.flatten()[keep]).view(64, 500)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=case)
        if case == "one row dominates":
            assert int((vals[7] > 0).sum()) > 16
