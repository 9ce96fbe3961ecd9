"""Gated and ProLU SAEs: forward passes and losses against float64 references, the gradients each family's
training rule prescribes (frozen decoder in Gated's auxiliary term, ProLU's synthetic gradients), short
training runs, and bad configs."""
import math

import pytest
import torch

from sae_core import SAE, ConfigError, Trainer
from sae_core.architectures import StepContext, parse_sae_config
from sae_core.architectures.prolu import prolu
from sae_core.sources import SyntheticSource

D, N, B = 16, 64, 48
CTX = StepContext(mse_scale=0.7, input_rms=1.3, progress=0.5)
SMALL = SyntheticSource(d_in=D, n_features=64, active_per_vector=3, noise_std=0.01, seed=0, n_eval=1024)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def random_sae(arch: str, seed: int = 0, **kw) -> tuple[SAE, torch.Tensor]:
    """A float64 SAE with every parameter random (so gates, biases and scales all matter), and an input."""
    sae = SAE({"arch": arch, "d_in": D, "n_latents": N, "normalization": "none", "l1_coeff": 0.3, **kw}).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.net.named_parameters():
            scale = 0.3 if name == "r_mag" else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return sae, torch.randn(B, D, generator=gen, dtype=torch.float64)


def leaves(sae: SAE) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in sae.net.named_parameters()}


def fvu(x, x_hat):
    return CTX.mse_scale * ((x - x_hat) ** 2).sum(dim=1).mean()


def l1_ref(acts, W_dec, cfg):
    """lambda ||z||_1 of Gao et al. eq. 1 (lambda in the units of unit-RMS-norm inputs, so times input_rms),
    times the FVU's constant mse_scale, as the whole loss is."""
    warm = min(1.0, CTX.progress / cfg.l1_warmup_frac)
    w = W_dec.detach().norm(dim=1) if cfg.l1_decoder_norm else torch.ones(N, dtype=acts.dtype)
    return CTX.mse_scale * cfg.l1_coeff * warm * CTX.input_rms * (acts.abs() * w).sum(dim=1).mean()


def gated_ref(p, x, cfg, frozen=True):
    """Rajamanoharan et al.'s Gated SAE written out with an explicit magnitude matrix exp(r_mag) * W_gate."""
    xc = x - p["b_pre"]
    pi_gate = xc @ p["W_enc"].T + p["b_gate"]
    W_mag = torch.exp(p["r_mag"])[:, None] * p["W_enc"]
    pi_mag = xc @ W_mag.T + p["b_mag"]
    z = torch.where(pi_gate > 0, torch.clamp(pi_mag, min=0), torch.zeros_like(pi_mag))
    x_hat = z @ p["W_dec"] + p["b_pre"]
    gate_acts = torch.clamp(pi_gate, min=0)
    W_f, b_f = (p["W_dec"].detach(), p["b_pre"].detach()) if frozen else (p["W_dec"], p["b_pre"])
    return {"z": z, "x_hat": x_hat, "pi_gate": pi_gate, "pi_mag": pi_mag, "mse_loss": fvu(x, x_hat),
            "l1_loss": l1_ref(gate_acts, p["W_dec"], cfg), "aux_loss": fvu(x, gate_acts @ W_f + b_f)}


def prolu_ref(p, x, cfg):
    m = (x - p["b_pre"]) @ p["W_enc"].T
    gate = (m > 0) & (m + p["b_enc"] > 0)
    z = torch.where(gate, m, torch.zeros_like(m))
    x_hat = z @ p["W_dec"] + p["b_pre"]
    return {"m": m, "gate": gate, "z": z, "x_hat": x_hat, "mse_loss": fvu(x, x_hat),
            "l1_loss": l1_ref(z, p["W_dec"], cfg)}


# --- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder_norm", [False, True])
def test_gated_forward_matches_reference(decoder_norm):
    sae, x = random_sae("gated", l1_decoder_norm=decoder_norm)
    arch = sae.net
    assert {n for n, _ in arch.named_parameters()} == {"b_pre", "W_enc", "W_dec", "b_gate", "r_mag", "b_mag"}
    ref = gated_ref(leaves(sae), x, arch.cfg)
    # the random point exercises every case: gate shut with a positive magnitude, gate open with a negative one
    gate, mag = ref["pi_gate"] > 0, ref["pi_mag"] > 0
    assert (gate & mag).any() and (gate & ~mag).any() and (~gate & mag).any()
    out = arch.loss(x, CTX)
    close(out.code, ref["z"].detach())
    close(arch.encode(x), ref["z"].detach())
    close(arch.decode(out.code), ref["x_hat"].detach())
    close(arch.preactivation(x), ref["pi_mag"].detach())
    for name in ("mse_loss", "l1_loss", "aux_loss"):
        close(out.terms[name], ref[name].detach())
        assert not out.terms[name].requires_grad
    close(out.loss.detach(), (ref["mse_loss"] + ref["l1_loss"] + ref["aux_loss"]).detach())
    assert arch.constrain_decoder is (not decoder_norm)


@pytest.mark.parametrize("mode", ["ste", "relu"])
@pytest.mark.parametrize("decoder_norm", [False, True])
def test_prolu_forward_matches_reference(mode, decoder_norm):
    sae, x = random_sae("prolu", gradient=mode, l1_decoder_norm=decoder_norm)
    arch = sae.net
    ref = prolu_ref(leaves(sae), x, arch.cfg)
    m, gate = ref["m"].detach(), ref["gate"]
    assert (gate.any() and ((m > 0) & ~gate).any()), "the bias must shut some positive pre-activations"
    out = arch.loss(x, CTX)
    close(out.code, ref["z"].detach())
    close(arch.encode(x), ref["z"].detach())
    close(arch.decode(out.code), ref["x_hat"].detach())
    close(arch.preactivation(x), m)
    for name in ("mse_loss", "l1_loss"):
        close(out.terms[name], ref[name].detach())
    close(out.loss.detach(), (ref["mse_loss"] + ref["l1_loss"]).detach())
    assert arch.constrain_decoder is (not decoder_norm)


# --- gated gradients -----------------------------------------------------------------------------
def grads(loss, params, names):
    got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, got)}


@pytest.mark.parametrize("decoder_norm", [False, True])
def test_gated_gradients_freeze_the_decoder_in_aux_and_gate_learns_only_from_l1_and_aux(decoder_norm):
    sae, x = random_sae("gated", seed=1, l1_decoder_norm=decoder_norm)
    arch = sae.net
    arch.loss(x, CTX).loss.backward()
    got = {n: p.grad for n, p in arch.named_parameters()}
    names = list(got)

    p = leaves(sae)
    ref = gated_ref(p, x, arch.cfg)
    g_mse = grads(ref["mse_loss"], p, names)
    g_gate = grads(ref["l1_loss"] + ref["aux_loss"], p, names)
    for n in names:
        close(got[n], g_mse[n] + g_gate[n])
    # the magnitude path learns from the reconstruction only, the gate bias from L1 + aux only
    close(got["r_mag"], g_mse["r_mag"])
    close(got["b_mag"], g_mse["b_mag"])
    close(got["b_gate"], g_gate["b_gate"])
    assert g_gate["b_gate"].abs().max() > 0 and g_mse["r_mag"].abs().max() > 0
    # the decoder's gradient has no auxiliary (or, with decoder norms, penalty) part
    close(got["W_dec"], g_mse["W_dec"])
    # the check can see a missing detach: an unfrozen auxiliary decoder would change both gradients
    p2 = leaves(sae)
    unfrozen = gated_ref(p2, x, arch.cfg, frozen=False)
    g_unfrozen = grads(unfrozen["mse_loss"] + unfrozen["l1_loss"] + unfrozen["aux_loss"], p2, ["W_dec", "b_pre"])
    for n in ("W_dec", "b_pre"):
        assert (g_unfrozen[n] - got[n]).abs().max() > 1e-3, n


# --- ProLU gradients ---------------------------------------------------------------------------
def prolu_grads(g, m, b, mode):
    gate = ((m > 0) & (m + b > 0)).to(m.dtype)
    if mode == "ste":
        return g * gate * (1 + m), g * gate * m
    return g * gate, g * gate


@pytest.mark.parametrize("mode", ["ste", "relu"])
def test_prolu_function_gradients_are_the_synthetic_formulas(mode):
    gen = torch.Generator().manual_seed(2)
    for shape in [(40, N), (3, 5, N)]:  # the bias gradient sums over every broadcast dimension
        m = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
        b = (torch.randn(N, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        z = prolu(m, b, mode)
        gate = (m > 0) & (m + b > 0)
        assert gate.any() and ((m > 0) & ~gate).any()
        assert torch.equal(z, torch.where(gate, m, torch.zeros_like(m)).detach())
        z.backward(g)
        dm, db = prolu_grads(g, m.detach(), b.detach(), mode)
        assert b.grad.shape == (N,)
        torch.testing.assert_close(m.grad, dm, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, db.reshape(-1, N).sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["ste", "relu"])
def test_prolu_sae_gradients_follow_the_synthetic_formulas(mode):
    sae, x = random_sae("prolu", seed=3, gradient=mode)
    arch = sae.net
    arch.loss(x, CTX).loss.backward()

    # reference: autograd up to z, then the formulas back to the encoder by hand
    p = leaves(sae)
    xc = (x - p["b_pre"]).detach()
    m = xc @ p["W_enc"].detach().T
    gate = (m > 0) & (m + p["b_enc"].detach() > 0)
    z = torch.where(gate, m, torch.zeros_like(m)).requires_grad_()
    x_hat = z @ p["W_dec"] + p["b_pre"]
    (fvu(x, x_hat) + l1_ref(z, p["W_dec"], arch.cfg)).backward()
    dm, db = prolu_grads(z.grad, m, p["b_enc"].detach(), mode)
    close(arch.W_enc.grad, dm.T @ xc)
    close(arch.b_enc.grad, db.sum(0))
    close(arch.W_dec.grad, p["W_dec"].grad)
    close(arch.b_pre.grad, p["b_pre"].grad - (dm @ p["W_enc"].detach()).sum(0))
    # the two modes must disagree here, or the test could not tell them apart
    other = prolu_grads(z.grad, m, p["b_enc"].detach(), "relu" if mode == "ste" else "ste")
    assert (other[1].sum(0) - db.sum(0)).abs().max() > 1e-3


# --- training -------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    # 16 x 64 matmuls gain nothing from threads, and lose a lot to them on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", [{"arch": "gated"}, {"arch": "prolu", "gradient": "ste"},
                                    {"arch": "prolu", "gradient": "relu"}])
def test_short_training_run_and_l1_coefficient_controls_sparsity(family):
    l0 = {}
    for coeff in (1e-3, 1e-1):
        r = Trainer({"d_in": D, "n_latents": N, "normalization": "none", "l1_coeff": coeff, **family},
                    {"train_tokens": 256 * 300, "batch_size": 256, "lr": 3e-3, "dead_window_tokens": 2048,
                     "init_samples": 4096}, SMALL).run()
        assert r.status == "ok" and r.error is None
        assert math.isfinite(r.metrics["nmse"]) and r.metrics["nmse"] < 1.0, r.metrics
        l0[coeff] = r.metrics["l0"]
        # per step: encoder + decoder at 6Bdn each; Gated adds the frozen decoder's 2Bdn forward + 2Bdn backward
        per_token = (16 if family["arch"] == "gated" else 12) * D * N
        assert r.flops == pytest.approx(r.steps * 256 * per_token)
        assert {"mse_loss", "l1_loss"} <= set(r.curve[-1]) and (family["arch"] != "gated" or "aux_loss" in r.curve[-1])
    assert l0[1e-1] < 0.85 * l0[1e-3], l0


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, key", [
    ({"arch": "gated", "k": 4}, "k"),
    ({"arch": "prolu", "k": 4}, "k"),
    ({"arch": "prolu", "gradient": "other"}, "gradient"),
    ({"arch": "gated", "l1_coeff": -1}, "l1_coeff"),
    ({"arch": "prolu", "l1_coeff": -1}, "l1_coeff"),
    ({"arch": "gated", "l1_coeff": float("nan")}, "l1_coeff"),
    ({"arch": "gated", "gradient": "ste"}, "gradient"),  # a ProLU-only key
])
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        parse_sae_config({"d_in": D, "n_latents": N, **bad}, source="sweep.yaml", prefix="sae")
    assert f"sweep.yaml: sae.{key}:" in str(err.value)


def test_defaults():
    g = parse_sae_config({"arch": "gated", "d_in": D, "n_latents": N})
    p = parse_sae_config({"arch": "prolu", "d_in": D, "n_latents": N})
    assert p.gradient == "ste"
    for cfg in (g, p):
        assert (cfg.l1_coeff, cfg.l1_warmup_frac, cfg.l1_decoder_norm) == (5e-3, 0.05, False)
        arch = SAE(cfg).net
        assert type(arch).default_resamples == 4 and type(arch).train_defaults == {}
