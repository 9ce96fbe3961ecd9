"""relu and batchtopk against float64 references; the shared mechanisms they exercise: the L1 penalty,
the decoder-constraint opt-out, resampling, test-time activation swaps, per-family key checks."""
import math

import pytest
import torch

from sae_core import SAE, ConfigError, Trainer
from sae_core.architectures import StepContext, parse_sae_config
from sae_core.normalization import normalize
from sae_core.sources import SyntheticSource

SRC = SyntheticSource(d_in=16, n_features=64, active_per_vector=3, noise_std=0.01, seed=0, n_eval=1024)


def make(cfg: dict, seed: int = 0) -> SAE:
    sae = SAE({"d_in": 16, "n_latents": 48, "normalization": "none", **cfg}).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return sae


@pytest.mark.parametrize("decoder_norm", [False, True])
def test_relu_forward_and_loss_match_float64_reference(decoder_norm):
    sae = make({"arch": "relu", "l1_coeff": 0.03, "l1_warmup_frac": 0.2, "l1_decoder_norm": decoder_norm})
    a = sae.net
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ctx = StepContext(mse_scale=0.7, input_rms=1.3, progress=0.05)  # a quarter of the way through the warm-up
    out = a.loss(x, ctx)
    z = torch.clamp((x - a.b_pre) @ a.W_enc.T + a.b_enc, min=0)
    x_hat = z @ a.W_dec + a.b_pre
    weight = a.W_dec.norm(dim=1) if decoder_norm else torch.ones(48, dtype=torch.float64)
    # Gao et al. eq. 1 per vector, lambda = 0.03 warmed up to a quarter and in units of unit-RMS inputs
    # (times input_rms), the whole loss times the FVU's constant mse_scale
    per_vector = ((x - x_hat) ** 2).sum(1) + 0.03 * 0.25 * 1.3 * (z.abs() * weight).sum(1)
    l1 = 0.7 * 0.03 * 0.25 * 1.3 * (z.abs() * weight).sum(1).mean()
    mse = 0.7 * ((x - x_hat) ** 2).sum(1).mean()
    torch.testing.assert_close(out.loss, 0.7 * per_vector.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.code, z, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.terms["l1_loss"], l1.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss, mse + l1, rtol=1e-10, atol=0)
    assert a.constrain_decoder is (not decoder_norm)


@pytest.mark.parametrize("family", [{"arch": "relu"}, {"arch": "prolu"}])
def test_l1_coeff_is_the_papers_lambda_on_unit_norm_inputs(family):
    """On the default unit-norm inputs the training loss the trainer builds is mse_scale x Gao et al.'s eq. 1,
    mean_b ||x_b - x_hat_b||^2 + lambda ||z_b||_1 with lambda = l1_coeff: their B.2 grid means the same here."""
    lam = 1.7e-2
    session = Trainer({"d_in": 16, "n_latents": 48, "l1_coeff": lam, **family},
                      {"train_tokens": 1024, "batch_size": 256, "init_samples": 1024}, SRC).start()
    st = session.state
    assert st.input_rms == 1.0 and 1.0 < st.mse_scale < 1.5  # 1 / E||x - mean||^2 = 1 / (1 - ||mean||^2)
    a = session.sae.net.double()
    x = normalize(SRC.train_batch(3, 256).double(), "unit_norm")[0]
    out = a.loss(x, StepContext(mse_scale=st.mse_scale, input_rms=st.input_rms, progress=1.0))
    with torch.no_grad():
        z = a.encode(x)
        paper = (((x - z @ a.W_dec - a.b_pre) ** 2).sum(1) + lam * z.abs().sum(1)).mean()
    torch.testing.assert_close(out.loss.detach() / st.mse_scale, paper, rtol=1e-10, atol=0)
    # the old units (l1_coeff * sqrt(mse_scale) against the FVU) differ from the paper's by sqrt(mse_scale)
    assert abs(math.sqrt(st.mse_scale) - 1) > 1e-3


def test_relu_decoder_norm_option_leaves_decoder_unconstrained():
    cfg = {"arch": "relu", "d_in": 16, "n_latents": 48, "normalization": "none"}
    train = {"train_tokens": 256 * 20, "batch_size": 256, "lr": 3e-3}
    free = Trainer({**cfg, "l1_decoder_norm": True}, train, SRC).run().sae.net.W_dec.detach().norm(dim=1)
    unit = Trainer(cfg, train, SRC).run().sae.net.W_dec.detach().norm(dim=1)
    assert (free - 1).abs().max() > 1e-3
    torch.testing.assert_close(unit, torch.ones(48), rtol=0, atol=1e-6)


def test_relu_larger_l1_gives_sparser_code():
    l0 = {}
    for coeff in (1e-4, 3e-1):
        r = Trainer({"arch": "relu", "d_in": 16, "n_latents": 48, "normalization": "none", "l1_coeff": coeff},
                    {"train_tokens": 256 * 150, "batch_size": 256, "lr": 3e-3}, SRC).run()
        assert r.status == "ok" and r.metrics["nmse"] < 1
        l0[coeff] = r.metrics["l0"]
    assert l0[3e-1] < 0.7 * l0[1e-4], l0


def test_batchtopk_trains_at_k_per_row_on_average_and_uses_threshold_after_loading(tmp_path):
    r = Trainer({"arch": "batchtopk", "d_in": 16, "n_latents": 48, "k": 4, "normalization": "none"},
                {"train_tokens": 256 * 60, "batch_size": 256, "lr": 3e-3}, SRC, tmp_path).run()
    theta = float(r.sae.net.threshold)
    assert theta > 0 and r.curve[-1]["threshold"] > 0  # the curve points' stand-in, then eq. 8's estimate
    loaded = SAE.load(tmp_path)
    assert float(loaded.net.threshold) == theta
    x = SRC.eval_set()[:200]
    with torch.no_grad():
        z = loaded.encode(x)
        h = loaded.net.preactivation(x)
    torch.testing.assert_close(z, h * (h > theta))
    # training selection keeps exactly k*B over the batch
    with torch.no_grad():
        out = loaded.net.loss(SRC.train_batch(0, 256), StepContext(mse_scale=1.0))
    assert int((out.code.vals > 0).sum()) == 4 * 256
    assert 1 < r.metrics["l0"] < 12  # the inference threshold gives an L0 near k on held-out data


def eq8_reference(arch, batches, k: int) -> float:
    """Leask et al. 2025, eq. 8, dense in float64: theta = mean over batches of min{z_ij > 0} with z the
    batch-level top-(B k) of ReLU(W_enc (x - b_pre) + b_enc)."""
    W, b, b_pre = (t.detach().double() for t in (arch.W_enc, arch.b_enc, arch.b_pre))
    minima = []
    for x in batches:
        h = ((x.double() - b_pre) @ W.T + b).relu().flatten()
        kept = h.topk(k * x.shape[0]).values
        minima.append(float(kept[kept > 0].min()))
    return sum(minima) / len(minima)


@pytest.mark.parametrize("ema_decay, lr, batches", [(None, 3e-3, 8), (0.8, 3e-2, 8), (None, 3e-3, 3),
                                                   (None, 3e-3, 100)], ids=["raw", "ema", "3-batches", "all"])
def test_batchtopk_threshold_is_eq8_on_training_batches_with_the_final_weights(ema_decay, lr, batches):
    """After training, theta is eq. 8 computed with the weights the run keeps (raw or EMA) on its last
    `threshold_batches` training batches (all of them when it had fewer steps), not the running average of
    per-batch minima the curve points use during training (the estimate before this change)."""
    steps, B, k = 40, 256, 4
    r = Trainer({"arch": "batchtopk", "d_in": 16, "n_latents": 48, "k": k, "normalization": "none",
                 "threshold_batches": batches},
                {"train_tokens": B * steps, "batch_size": B, "lr": lr, "ema_decay": ema_decay}, SRC).run()
    assert r.status == "ok" and r.ema_used == (ema_decay is not None)  # the EMA case keeps the EMA weights
    used = range(steps - 1, max(steps - 1 - batches, -1), -1)
    want = eq8_reference(r.sae.net, [SRC.train_batch(s, B) for s in used], k)
    theta = float(r.sae.net.threshold)
    assert theta == pytest.approx(want, rel=1e-5)
    # the running estimate (what the old code kept as theta) is a different number
    stand_in = r.curve[-1]["threshold"]
    assert abs(stand_in - theta) > 1e-3 * theta, (stand_in, theta)
    # and the held-out metrics are those of this theta
    x = SRC.eval_set()
    with torch.no_grad():
        h = r.sae.net.preactivation(x)
    assert r.metrics["l0"] == pytest.approx(float((h > theta).sum(1).double().mean()), rel=1e-6)


def test_resampling_revives_dead_latents_and_resets_their_adam_moments():
    trainer = Trainer({"arch": "relu", "d_in": 16, "n_latents": 48, "normalization": "none"},
                      {"train_tokens": 256 * 4, "batch_size": 256, "dead_window_tokens": 256, "lr": 1e-3,
                       "resample_dead": 0}, SRC)
    s = trainer.start()
    arch = s.sae.net
    for step in range(2):
        s.step(SRC.train_batch(step, 256))
    dead = torch.tensor([3, 17, 30])
    with torch.no_grad():  # kill three latents: encoder rows pointing away, biases very negative
        arch.b_enc[dead] = -100.0
    s.tokens_since_fired[:] = 0
    s.tokens_since_fired[dead] = 10_000
    W_enc, W_dec = arch.W_enc.detach().clone(), arch.W_dec.detach().clone()
    x = SRC.train_batch(5, 256)
    assert s.resample_dead(x) == 3
    live = torch.ones(48, dtype=torch.bool)
    live[dead] = False
    assert torch.equal(arch.W_enc[live], W_enc[live]) and torch.equal(arch.W_dec[live], W_dec[live])
    assert not torch.equal(arch.W_dec[dead], W_dec[dead])
    torch.testing.assert_close(arch.W_dec[dead].norm(dim=1), torch.ones(3, dtype=torch.float32))
    assert (arch.b_enc[dead] == 0).all()
    for name, p in arch.named_parameters():
        if name != "b_pre":
            state = s.opt.state[p]
            assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all(), name
            assert (state["exp_avg_sq"][live] != 0).any(), name
    assert (s.tokens_since_fired[dead] == 0).all()
    with torch.no_grad():  # revived: each fires on some inputs
        z = arch.encode(x)
    assert ((z[:, dead] > 0).sum(0) > 0).all()


def test_resampling_schedule_defaults_per_family():
    relu = Trainer({"arch": "relu", "d_in": 16, "n_latents": 48}, {"train_tokens": 1000, "batch_size": 10}, SRC)
    topk = Trainer({"arch": "topk", "d_in": 16, "n_latents": 48, "k": 4}, {"train_tokens": 1000, "batch_size": 10}, SRC)
    off = Trainer({"arch": "relu", "d_in": 16, "n_latents": 48}, {"train_tokens": 1000, "batch_size": 10,
                                                                  "resample_dead": 0}, SRC)
    assert relu.resample_steps == {20, 40, 60, 80} and topk.resample_steps == set() and off.resample_steps == set()


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk", "multi_topk"])
def test_test_time_activation_swap(arch):
    extra = {"k": 2} if arch in ("topk", "batchtopk", "multi_topk") else {}
    sae = make({"arch": arch, **extra}).float()
    x = torch.randn(30, 16)
    with torch.no_grad():
        h = sae.net.preactivation(x)
        code, _ = sae.encode_with(x, k=5)
        z = sae.net.dense_latents(code)
        ref = torch.zeros_like(h).scatter(1, h.topk(5).indices, h.topk(5).values).relu()
        torch.testing.assert_close(z, ref)
        zj, _ = sae.encode_with(x, threshold=0.3)
        torch.testing.assert_close(zj, h * (h > 0.3))
        torch.testing.assert_close(sae.decode(code), z @ sae.net.W_dec + sae.net.b_pre)


@pytest.mark.parametrize("cfg, key, allowed", [
    ({"arch": "relu", "k": 4}, "k", "l1_coeff"),
    ({"arch": "topk", "l1_coeff": 0.1}, "l1_coeff", "k_aux"),
    ({"arch": "relu", "l1_coeff": -1.0}, "l1_coeff", "greater than or equal to 0"),
])
def test_keys_that_do_not_apply_are_rejected_with_the_keys_that_do(cfg, key, allowed):
    with pytest.raises(ConfigError) as err:
        parse_sae_config({"d_in": 16, "n_latents": 48, **cfg}, source="sweep.yaml")
    msg = str(err.value)
    assert "sweep.yaml" in msg and key in msg and allowed in msg
