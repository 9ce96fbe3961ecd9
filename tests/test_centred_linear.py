"""centred_linear against autograd through F.linear(x - b_pre, W, b) in float64: values and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from sae_core.kernels.centred_linear import centred_linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [False, True])
def test_values_and_gradients_match_autograd(bias, x_grad):
    g = torch.Generator().manual_seed(0)
    B, d, n = 13, 7, 29

    def leaves():
        return [torch.randn(*s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                .requires_grad_(i > 0 or x_grad) for i, s in enumerate([(B, d), (d,), (n, d), (n,)])]

    upstream = torch.randn(B, n, generator=g, dtype=torch.float64)
    ours, ref = leaves(), leaves()
    out = centred_linear(ours[0], ours[1], ours[2], ours[3] if bias else None)
    expected = F.linear(ref[0] - ref[1], ref[2], ref[3] if bias else None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert (ours[0].grad is not None) == x_grad


def test_under_autocast_gradients_have_the_parameters_dtype():
    x, b_pre = torch.randn(8, 16), torch.zeros(16, requires_grad=True)
    W, b = torch.randn(32, 16, requires_grad=True), torch.zeros(32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = centred_linear(x, b_pre, W, b)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert W.grad.dtype == b_pre.grad.dtype == b.grad.dtype == torch.float32
    ref = F.linear(x - b_pre.detach(), W.detach(), b.detach())
    torch.testing.assert_close(W.grad, 2 * ref.t() @ x, rtol=0.05, atol=0.5)
