"""Adam with row-sparse gradients against torch's Adam on the dense equivalent (float64)."""
import pytest
import torch

from sae_core import optim
from sae_core.optim import Adam, clip_grad_norm

N, D = 300, 24


def _sparse_grad(seed, rows=40):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (rows,), generator=g)  # duplicates, and most rows absent
    vals = torch.randn(rows, D, generator=g, dtype=torch.float64)
    return torch.sparse_coo_tensor(idx[None], vals, (N, D), check_invariants=True)  # uncoalesced, as autograd sums them


@pytest.mark.parametrize("block_rows", [7, 1000])  # many blocks, and one block holding every row
def test_row_sparse_adam_equals_dense_adam(monkeypatch, block_rows):
    monkeypatch.setattr(optim, "ROW_BLOCK_ENTRIES", block_rows * D)
    init = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bias0 = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(bias0.clone())]
    ref = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(bias0.clone())]
    opt = Adam(ours, lr=1e-2, betas=(0.8, 0.95), eps=1e-8)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-8, foreach=False)
    for step in range(6):
        g, gb = _sparse_grad(step), torch.randn(N, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)
        if step == 3:  # every row present: the complete-gradient fast path
            g = torch.sparse_coo_tensor(torch.arange(N)[None], torch.randn(N, D, dtype=torch.float64), (N, D),
                                        check_invariants=True)
        ours[0].grad, ours[1].grad = g, gb
        ref[0].grad, ref[1].grad = g.to_dense(), gb.clone()
        opt.step()
        ref_opt.step()
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)
    # rows that never received a gradient after step 0 still moved (moments decay, as in dense Adam)
    assert not torch.equal(ours[0].detach(), init)
    state = opt.state[ours[0]]
    assert float(state["step"]) == 6 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(state["exp_avg_sq"], ref_opt.state[ref[0]]["exp_avg_sq"], rtol=1e-10, atol=1e-14)


def test_clip_grad_norm_matches_torch_on_the_dense_equivalent():
    g = _sparse_grad(7)
    p, r = torch.nn.Parameter(torch.zeros(N, D, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(N, D, dtype=torch.float64))
    b, rb = (torch.nn.Parameter(torch.zeros(N, dtype=torch.float64)) for _ in range(2))
    p.grad, r.grad = g, g.to_dense()
    b.grad = torch.ones(N, dtype=torch.float64)
    rb.grad = b.grad.clone()
    total = clip_grad_norm([p, b], 1.0)
    ref_total = torch.nn.utils.clip_grad_norm_([r, rb], 1.0)
    assert total == pytest.approx(float(ref_total), rel=1e-12)
    torch.testing.assert_close(p.grad.to_dense(), r.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-12, atol=1e-15)
