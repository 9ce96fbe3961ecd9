"""The dense families' sparse-code products (kernels/dense_code.py, centred_linear's sparse backward) against
plain float64 autograd, on codes either side of SPARSE_DENSITY: values and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from sae_core.kernels import dense_code
from sae_core.kernels.centred_linear import centred_linear
from sae_core.kernels.dense_code import decode_code, nonzero_entries

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


@pytest.mark.parametrize("density", [0.002, 0.3])
def test_centred_linear_with_a_sparse_upstream_gradient(density):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(D,), (N, D), (N,)]]
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    upstream = _code(density, 4) * torch.randn(B, N, generator=g, dtype=torch.float64)
    (centred_linear(x, *ours) * upstream).sum().backward()
    (F.linear(x - ref[0], ref[1], ref[2]) * upstream).sum().backward()
    for a, b in zip(ours, ref):
        grad = a.grad.to_dense() if a.grad.is_sparse else a.grad
        torch.testing.assert_close(grad, b.grad, rtol=1e-12, atol=1e-12)


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
