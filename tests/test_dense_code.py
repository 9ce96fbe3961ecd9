"""The dense families' sparse-code path (kernels/dense_code.py, centred_linear's sparse backward,
architectures/entry_code.py) against plain float64 autograd, either side of SPARSE_DENSITY: values and every
gradient, each kernel alone and every family's whole loss."""
import pytest
import torch
import torch.nn.functional as F

from sae_core.kernels import dense_code
from sae_core.kernels.centred_linear import centred_linear
from sae_core.kernels.dense_code import decode_code, decode_entries, entries_above, gather_entries, nonzero_entries

B, D, N = 200, 24, 3000


def _code(density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, N, generator=g, dtype=torch.float64) < density
    return (torch.rand(B, N, generator=g, dtype=torch.float64) + 0.1) * keep


@pytest.mark.parametrize("density", [0.002, 0.3])
def test_decode_matches_the_matmul(density):
    z0 = _code(density, 0)
    W0 = torch.randn(N, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (nonzero_entries(z0) is not None) == (density < dense_code.SPARSE_DENSITY)
    z, W = z0.clone().requires_grad_(), W0.clone().requires_grad_()
    zr, Wr = z0.clone().requires_grad_(), W0.clone().requires_grad_()
    out = decode_code(z, W)
    torch.testing.assert_close(out, zr @ Wr, rtol=1e-12, atol=1e-12)
    (out * upstream).sum().backward()
    (zr @ Wr * upstream).sum().backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-12, atol=1e-12)  # dense: inactive entries get theirs too
    grad_W = W.grad.to_dense() if W.grad.is_sparse else W.grad
    torch.testing.assert_close(grad_W, Wr.grad, rtol=1e-12, atol=1e-12)


def test_a_code_with_few_active_latents_gives_a_row_sparse_decoder_gradient():
    z = torch.zeros(B, N, dtype=torch.float64)
    z[torch.arange(B), torch.arange(B) % 7] = 1.0  # 7 latents in all
    W = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    decode_code(z, W).sum().backward()
    assert W.grad.is_sparse and W.grad._indices()[0].tolist() == list(range(7))


def _entries(density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _code(density, seed).nonzero(as_tuple=True)


@pytest.mark.parametrize("x_grad", [False, True])
def test_centred_linear_with_a_sparse_upstream_gradient(x_grad):
    """h's gradient arriving as sparse COO (gather_entries) gives every input's gradient plain autograd gives."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    leaves = [x0] + [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(D,), (N, D), (N,)]]
    ours = [t.clone().requires_grad_(x_grad or i > 0) for i, t in enumerate(leaves)]
    ref = [t.clone().requires_grad_(x_grad or i > 0) for i, t in enumerate(leaves)]
    rows, latents = _entries(0.002, 4)
    upstream = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    (gather_entries(centred_linear(*ours), rows, latents) * upstream).sum().backward()
    (F.linear(ref[0] - ref[1], ref[2], ref[3])[rows, latents] * upstream).sum().backward()
    assert ours[2].grad.is_sparse == (2 * latents.unique().numel() < N)
    for a, b in zip(ours, ref):
        if b.grad is not None:
            grad = a.grad.to_dense() if a.grad.is_sparse else a.grad
            torch.testing.assert_close(grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.002, 0.05])
def test_decode_entries_matches_the_matmul(density):
    rows, latents = _entries(density, 5)
    g = torch.Generator().manual_seed(6)
    vals0 = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    W0 = torch.randn(N, D, generator=g, dtype=torch.float64)
    upstream = torch.randn(B, D, generator=g, dtype=torch.float64)
    vals, W = vals0.clone().requires_grad_(), W0.clone().requires_grad_()
    vr, Wr = vals0.clone().requires_grad_(), W0.clone().requires_grad_()
    out = decode_entries(rows, latents, vals, W, B)
    z = torch.zeros(B, N, dtype=torch.float64).index_put((rows, latents), vr)
    torch.testing.assert_close(out, z @ Wr, rtol=1e-12, atol=1e-12)
    (out * upstream).sum().backward()
    (z @ Wr * upstream).sum().backward()
    torch.testing.assert_close(vals.grad, vr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W.grad.to_dense() if W.grad.is_sparse else W.grad, Wr.grad, rtol=1e-12, atol=1e-12)


def test_entries_above_goes_sparse_only_below_the_density():
    h = torch.randn(B, N, dtype=torch.float64)
    bound = torch.full((N,), 2.9, dtype=torch.float64)  # ~0.2% of a normal's mass
    rows, latents = entries_above(h, bound)
    assert torch.equal(torch.stack([rows, latents]), (h > bound).nonzero().T)
    assert entries_above(h, bound - 2) is None  # ~7%
    assert entries_above(h.float().bfloat16(), bound) is None  # the CPU's sparse kernels take no bf16


def test_relu_training_step_matches_dense_autograd_once_the_code_is_sparse():
    """A whole ReLU SAE loss (encoder, L1, decoder) with a code below SPARSE_DENSITY: every parameter's
    gradient equals plain autograd's."""
    from sae_core.architectures import build_architecture, parse_sae_config
    from sae_core.architectures.base import StepContext

    torch.manual_seed(0)
    arch = build_architecture(parse_sae_config({"arch": "relu", "d_in": D, "n_latents": N, "l1_coeff": 1e-2})).double()
    with torch.no_grad():
        arch.W_dec.copy_(F.normalize(torch.randn(N, D, dtype=torch.float64), dim=1))
        arch.W_enc.copy_(arch.W_dec)
        arch.b_enc.fill_(-0.55)  # ~0.3% of the latents active on unit-norm inputs
        arch.b_pre.copy_(0.01 * torch.randn(D, dtype=torch.float64))
    x = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    ctx = StepContext(mse_scale=1.3, input_rms=1.0, progress=1.0)
    z = arch.encode(x)
    assert 0 < float((z > 0).double().mean()) < dense_code.SPARSE_DENSITY
    arch.loss(x, ctx).loss.backward()
    ours = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for k, p in arch.named_parameters()}
    p = dict(arch.named_parameters())
    z = F.relu((x - p["b_pre"]) @ p["W_enc"].T + p["b_enc"])
    mse = ((x - (z @ p["W_dec"] + p["b_pre"])) ** 2).sum(-1).mean() * 1.3
    ref = torch.autograd.grad(mse + 1e-2 * 1.3 * z.sum() / B, list(p.values()))
    for (name, _), r in zip(p.items(), ref):
        torch.testing.assert_close(ours[name], r, rtol=1e-10, atol=1e-12, msg=name)


# Each dense family at a trained code's density: (config, the parameter that sets its activity, the tensor it
# thresholds); shifting the parameter puts ~0.3% of the entries above it.
FAMILIES = {
    "relu": ({"arch": "relu", "l1_coeff": 1e-2}, "b_enc", lambda a, x: a.preactivation(x)),
    "relu_decoder_norm": ({"arch": "relu", "l1_decoder_norm": True}, "b_enc", lambda a, x: a.preactivation(x)),
    "prolu_ste": ({"arch": "prolu", "gradient": "ste"}, "b_enc", lambda a, x: a.preactivation(x)),
    "prolu_relu": ({"arch": "prolu", "gradient": "relu"}, "b_enc", lambda a, x: a.preactivation(x)),
    "gated": ({"arch": "gated"}, "b_gate", lambda a, x: a._paths(a._shared(x))[0]),
    "gated_decoder_norm": ({"arch": "gated", "l1_decoder_norm": True}, "b_gate", lambda a, x: a._paths(a._shared(x))[0]),
    # a wide window, so that many entries sit just below the threshold, where only θ takes gradient
    "jumprelu": ({"arch": "jumprelu", "bandwidth": 0.05}, "threshold", lambda a, x: a.preactivation(x)),
    "jumprelu_target": ({"arch": "jumprelu", "bandwidth": 0.05, "sparsity": "target_l0", "target_l0": 3.0},
                        "threshold", lambda a, x: a.preactivation(x)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_loss_on_its_active_entries_equals_the_dense_loss(family, monkeypatch):
    """Below SPARSE_DENSITY the loss runs on EntryCode; its value, terms and every gradient equal the same
    family's dense loss (SPARSE_DENSITY 0), in float64."""
    from sae_core.architectures import build_architecture, parse_sae_config
    from sae_core.architectures.base import StepContext
    from sae_core.architectures.entry_code import EntryCode

    cfg, activity, preact = FAMILIES[family]
    torch.manual_seed(0)
    arch = build_architecture(parse_sae_config({"d_in": D, "n_latents": N, **cfg})).double()
    arch.reset_parameters(tied=True, seed=0)
    x = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    with torch.no_grad():
        arch.b_pre.copy_(0.01 * torch.randn(D, dtype=torch.float64))
        for name, p in arch.named_parameters():
            if name not in ("b_pre", "W_enc", "W_dec"):
                p.copy_(0.05 * torch.randn_like(p))  # per-latent parameters away from their init
        q = float(preact(arch, x).flatten().quantile(0.997))
        p = getattr(arch, activity)
        p.copy_(p.abs() + q if activity == "threshold" else p - q)
    ctx = StepContext(mse_scale=1.3, input_rms=1.0, progress=0.5)

    def run():
        arch.zero_grad(set_to_none=True)
        out = arch.loss(x, ctx)
        out.loss.backward()
        grads = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for k, p in arch.named_parameters()
                 if p.grad is not None}
        return out, grads

    sparse, sparse_grads = run()
    assert isinstance(sparse.code, EntryCode)
    monkeypatch.setattr(dense_code, "SPARSE_DENSITY", 0.0)
    dense, dense_grads = run()
    assert isinstance(dense.code, torch.Tensor)
    assert 0 < float((dense.code != 0).double().mean()) < 0.01
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-12, atol=1e-12)
    for term, value in dense.terms.items():
        torch.testing.assert_close(sparse.terms[term], value, rtol=1e-12, atol=1e-12, msg=term)
    torch.testing.assert_close(sparse.code.dense(N), dense.code, rtol=1e-12, atol=0)
    assert torch.equal(arch.active_latents(sparse.code), arch.active_latents(dense.code))
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    if activity == "threshold":  # the window really held entries below the threshold
        h = preact(arch, x)
        assert bool(((h <= arch.threshold) & (h > arch.threshold - 0.025)).any())
