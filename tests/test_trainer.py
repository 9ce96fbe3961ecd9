"""The trainer core: the recipe's invariants, resume, divergence, bad input, recovery of known features."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sae_core import SAE, ConfigError, Trainer
from sae_core import trainer as trainer_module
from sae_core.architectures import StepContext, parse_sae_config
from sae_core.checkpoint import MANIFEST, consolidate
from sae_core.config import HORIZON_BETA, HORIZON_D1, HORIZON_MAX, TrainConfig
from sae_core.geometric_median import geometric_median
from sae_core.normalization import denormalize, normalize
from sae_core.sources import ActivationSource, SyntheticSource, mmcs
from sae_core.trainer import _remove_parallel_grad, curve_steps, lr_at

SMALL = SyntheticSource(d_in=16, n_features=64, active_per_vector=3, noise_std=0.01, seed=0, n_eval=1024)


def topk_cfg(**kw):
    return {"arch": "topk", "d_in": 16, "n_latents": 64, "k": 4, "normalization": "none", **kw}


def train_cfg(**kw):
    return {"train_tokens": 256 * 12, "batch_size": 256, "lr": 1e-3, "dead_window_tokens": 1024, **kw}


def test_decoder_rows_unit_norm_after_every_step(tmp_path):
    for _ in range(4):  # one step per run, each resuming the last: the norm is seen after every step
        result = Trainer(topk_cfg(), train_cfg(), SMALL, tmp_path).run(max_steps=1)
        norms = result.sae.net.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    assert result.steps == 4


@pytest.mark.parametrize("block_rows", [None, 7])  # one block; blocks of 7 rows, the last one partial
def test_parallel_gradient_removal_leaves_gradients_orthogonal_to_rows(block_rows, monkeypatch):
    if block_rows:
        monkeypatch.setattr(trainer_module, "PROJECTION_BLOCK", 16 * block_rows)
    W = torch.nn.Parameter(torch.randn(50, 16, dtype=torch.float64))
    with torch.no_grad():
        W.div_(W.norm(dim=1, keepdim=True))
    W.grad = torch.randn(50, 16, dtype=torch.float64)
    before = W.grad.clone()
    _remove_parallel_grad(W)
    assert (W.grad * W).sum(dim=1).abs().max() < 1e-12
    # only the parallel part was removed: the orthogonal part is untouched
    parallel = (before * W).sum(dim=1, keepdim=True) * W
    torch.testing.assert_close(W.grad, before - parallel)


def test_geometric_median_matches_direct_minimisation():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(size=(300, 5)), rng.normal(loc=8.0, size=(40, 5))])  # skewed by outliers
    ref = minimize(lambda y: np.linalg.norm(pts - y, axis=1).sum(), pts.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 200000, "maxfev": 200000}).x
    got = geometric_median(torch.from_numpy(pts)).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(pts.mean(0) - ref).max() > 0.1  # the test would notice a plain mean


def test_geometric_median_far_from_the_origin_matches_weiszfeld_on_explicit_distances():
    """Vectors that share an offset far larger than their spread (a residual stream's is large): neither the
    mat-vec distances nor the stopping rule may lose the spread to the offset."""
    rng = np.random.default_rng(1)
    noise = rng.standard_t(df=3, size=(4000, 64))
    noise[:40] *= 30.0  # outliers drag the mean, not the median
    offset = rng.normal(scale=1e7, size=64)
    y = noise.mean(0)  # the float64 reference: Weiszfeld on explicit differences, without the offset
    for _ in range(5000):
        w = 1.0 / np.linalg.norm(noise - y, axis=1)
        y, prev = (w[:, None] * noise).sum(0) / w.sum(), y
        if np.linalg.norm(y - prev) < 1e-14:
            break
    got = geometric_median(torch.from_numpy(noise + offset)).numpy() - offset
    assert np.abs(got - y).max() < 1e-5
    assert np.abs(noise.mean(0) - y).max() > 0.1  # the test would notice a plain mean


def test_auxk_revives_dead_latents():
    """More true features than latents and a short dead window: latents die early, AuxK brings them back."""
    src = SyntheticSource(d_in=32, n_features=1024, active_per_vector=4, seed=1, n_eval=1024)
    dead = {}
    for coeff in (0.0, 1 / 32):
        r = Trainer({"arch": "topk", "d_in": 32, "n_latents": 256, "k": 4, "normalization": "none", "aux_coeff": coeff},
                    {"train_tokens": 200_000, "batch_size": 512, "lr": 3e-3, "dead_window_tokens": 5_000,
                     "tied_init": False}, src).run()
        dead[coeff] = r.metrics["dead_frac"]
        if coeff:
            assert any("aux_loss" in row for row in r.curve)
    assert dead[0.0] > 0.3, dead  # the case does kill latents
    assert dead[1 / 32] < dead[0.0] - 0.1, dead


@pytest.mark.parametrize("normalization", ["batch", "token"])
def test_auxk_loss_normalisation_matches_float64_reference_and_is_nan_safe(normalization):
    """batch: the reference code's sum ||e - ê||^2 / sum ||e - mean(e)||^2; token: Gao et al. §A.6's per-token
    normaliser, mean_b ||e_b - ê_b||^2 / ||e_b||^2. Both against a dense float64 re-computation."""
    cfg = parse_sae_config(topk_cfg(k=2, k_aux=4, aux_coeff=0.5, aux_normalization=normalization))
    sae = SAE(cfg).double()
    sae.net.reset_parameters(True, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # b_pre far from 0: the per-token normaliser must be ||e||, not ||e + b_pre||
        sae.net.b_pre.copy_(torch.randn(16, generator=gen, dtype=torch.float64) * 3)
        sae.net.b_enc.copy_(torch.randn(64, generator=gen, dtype=torch.float64) * 0.1)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64) * 2
    dead = torch.arange(10, 30)
    out = sae.net.loss(x, StepContext(mse_scale=0.3, dead_latents=dead))
    # dense re-computation of the same quantities
    a = sae.net
    pre = (x - a.b_pre) @ a.W_enc.T + a.b_enc
    top = pre.topk(2).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
    e = x - (z @ a.W_dec + a.b_pre)
    sub = pre[:, dead]
    at = sub.topk(4).indices
    za = torch.zeros_like(sub).scatter(1, at, sub.gather(1, at)).relu()
    e_hat = za @ a.W_dec[dead]
    err = ((e - e_hat) ** 2).sum(1)
    by_batch = err.sum() / ((e - e.mean(0)) ** 2).sum()
    by_token = (err / (e ** 2).sum(1)).mean()
    aux = by_batch if normalization == "batch" else by_token
    assert abs(float((by_batch - by_token).detach())) > 1e-3 * float(by_batch.detach())  # the two readings differ here
    mse = 0.3 * (e ** 2).sum(1).mean()
    torch.testing.assert_close(out.terms["aux_loss"], aux.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.loss.detach(), (mse + 0.5 * aux).detach(), rtol=1e-10, atol=0)
    # a zero normaliser (one row has no variance over the batch; a perfectly reconstructed token has no
    # residual) contributes 0, never NaN
    if normalization == "batch":
        out1 = a.loss(x[:1], StepContext(mse_scale=0.3, dead_latents=dead))
        assert math.isfinite(float(out1.loss.detach())) and float(out1.terms["aux_loss"]) == 0.0
    else:
        e0 = e.clone()
        e0[3] = 0.0
        got = a.aux_loss(e0, e_hat, StepContext(mse_scale=0.3))
        keep = torch.ones(32, dtype=torch.bool)
        keep[3] = False
        torch.testing.assert_close(got, (err / (e ** 2).sum(1))[keep].sum() / 32, rtol=1e-10, atol=0)


def test_multi_topk_loss_is_lk_plus_l4k_over_8():
    sae = SAE({"arch": "multi_topk", "d_in": 16, "n_latents": 64, "k": 3, "normalization": "none"})
    sae.net.reset_parameters(True, 1)
    x = torch.randn(20, 16)
    out = sae.net.loss(x, StepContext(mse_scale=1.0))
    pre = (x - sae.net.b_pre) @ sae.net.W_enc.T + sae.net.b_enc

    def recon_err(kk):
        top = pre.topk(kk).indices
        z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
        return ((x - z @ sae.net.W_dec - sae.net.b_pre) ** 2).sum(1).mean()

    torch.testing.assert_close(out.loss.detach(), (recon_err(3) + recon_err(12) / 8).detach(), rtol=1e-5, atol=1e-6)
    assert out.code.idx.shape == (20, 3)  # inference code keeps k


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path):
    cfg = train_cfg(train_tokens=256 * 10, checkpoint_every_tokens=256 * 3, ema_decay=0.9)
    straight = Trainer(topk_cfg(), cfg, SMALL, tmp_path / "a").run()
    first = Trainer(topk_cfg(), cfg, SMALL, tmp_path / "b").run(max_steps=4)
    assert first.status == "stopped" and (tmp_path / "b" / MANIFEST).is_file()
    resumed = Trainer(topk_cfg(), cfg, SMALL, tmp_path / "b").run()
    assert resumed.status == "ok" and resumed.steps == straight.steps == 10
    for (name, a), (_, b) in zip(straight.sae.net.state_dict().items(), resumed.sae.net.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.curve == straight.curve
    assert resumed.metrics == straight.metrics
    assert resumed.flops == straight.flops


def test_divergence_stops_with_status_and_keeps_last_good_checkpoint(tmp_path):
    class Poisoned(ActivationSource):
        d_in = 16

        def train_batch(self, step, batch_size):
            x = SMALL.train_batch(step, batch_size)
            return x * 1e30 if step == 5 else x  # finite, but its squared error overflows: the loss diverges

        def eval_set(self):
            return SMALL.eval_set()

    r = Trainer(topk_cfg(), train_cfg(checkpoint_every_tokens=256 * 2), Poisoned(), tmp_path).run()
    assert r.status == "diverged" and "step 5" in r.error and r.steps == 5
    assert json.loads((tmp_path / MANIFEST).read_text())["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in consolidate(tmp_path).net.state_dict().values())


@pytest.mark.parametrize("bad, field", [
    ({"k": 65}, "k"), ({"k": 0}, "k"), ({"n_latents": 0}, "n_latents"), ({"arch": "nope"}, "arch"),
    ({"k_aux": 1000}, "k_aux"), ({"normalization": "zscore"}, "normalization"), ({"bogus": 1}, "bogus"),
])
def test_bad_sae_config_names_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        parse_sae_config(topk_cfg(**bad), source="sweep.yaml")
    assert "sweep.yaml" in str(err.value) and field in str(err.value)


def test_multi_topk_checks_the_wide_k_fits():
    with pytest.raises(ConfigError, match="multi_k_factor"):
        parse_sae_config({"arch": "multi_topk", "d_in": 16, "n_latents": 64, "k": 20})


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1.0, 0.0])
def test_non_finite_or_non_positive_lr_is_rejected(lr):
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(topk_cfg(), train_cfg(lr=lr), SMALL)


def test_activation_dimension_mismatch_is_rejected():
    with pytest.raises(ConfigError, match="d_in"):
        Trainer(topk_cfg(d_in=17), train_cfg(), SMALL)


def test_lr_auto_and_schedule():
    assert TrainConfig(train_tokens=1).resolved_lr(2**14) == pytest.approx(2e-4)
    assert TrainConfig(train_tokens=1).resolved_lr(2**16) == pytest.approx(1e-4)
    cfg = TrainConfig(train_tokens=100, batch_size=1, lr_warmup_frac=0.1, lr_decay_frac=0.2)
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)


def test_lr_horizon_is_the_paper_rule_scaled_up_for_short_runs():
    def factor(tokens: int, n: int = 2**16) -> float:
        return TrainConfig(train_tokens=tokens, lr="horizon").resolved_lr(n) / TrainConfig(train_tokens=tokens).resolved_lr(n)

    assert factor(int(HORIZON_D1)) == pytest.approx(1.0, rel=1e-6)
    assert factor(10**12) == 1.0  # past the horizon where it was measured to meet the rule: the rule itself
    short = int(HORIZON_D1 / 100)
    assert factor(short) == pytest.approx(100**HORIZON_BETA, rel=1e-6)
    assert factor(short, n=2**12) == pytest.approx(factor(short, n=2**20))  # the rule's n-dependence is kept
    assert factor(1) == HORIZON_MAX
    factors = [factor(int(t)) for t in np.logspace(0, 11, 45)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert TrainConfig(train_tokens=10**6, lr=1e-3).resolved_lr(2**14) == 1e-3
    # the TopK family's default, where it was measured; the L1 families keep the paper's rule
    from sae_core.trainer import resolve_configs

    lr_of = {arch: resolve_configs({"arch": arch, "d_in": 16, "n_latents": 64, **({"k": 4} if k else {})},
                                   {"train_tokens": 512})[1].lr
             for arch, k in [("topk", 1), ("batchtopk", 1), ("multi_topk", 1), ("relu", 0), ("jumprelu", 0)]}
    assert lr_of == {"topk": "horizon", "batchtopk": "horizon", "multi_topk": "horizon", "relu": "auto",
                     "jumprelu": "auto"}


def test_curve_steps_cover_every_decade():
    steps = curve_steps(total_steps=10_000, batch_size=100, per_decade=4)
    assert steps[0] == 1 and steps[-1] == 10_000 and steps == sorted(set(steps))
    tokens = np.array(steps) * 100
    for decade in range(2, 7):
        assert ((tokens >= 10**decade) & (tokens < 10 ** (decade + 1))).sum() >= 3 or decade == 6


@pytest.mark.parametrize("kind", ["unit_norm", "standardize"])
def test_normalisation_round_trip_and_metrics_in_original_space(kind):
    x = torch.randn(64, 16) * 5 + 3
    xn, stats = normalize(x, kind)
    torch.testing.assert_close(denormalize(xn, stats), x)
    assert xn.mean(dim=1).abs().max() < 1e-5
    expected = torch.ones(64) if kind == "unit_norm" else torch.full((64,), 4.0)  # sqrt(d_in) = 4
    torch.testing.assert_close(xn.norm(dim=1), expected)
    r = Trainer(topk_cfg(normalization=kind), train_cfg(), SMALL).run()
    ev = SMALL.eval_set()
    with torch.no_grad():
        x_hat = r.sae.reconstruct(ev)
    nmse = float(((ev - x_hat) ** 2).sum() / ((ev - ev.mean(0)) ** 2).sum())
    assert r.metrics["nmse"] == pytest.approx(nmse, rel=1e-4)


def test_ema_keeps_the_better_of_raw_and_averaged():
    r = Trainer(topk_cfg(), train_cfg(ema_decay=0.5), SMALL).run()
    if r.ema_used:
        assert r.metrics["nmse"] <= r.metrics["nmse_raw"]
    else:
        assert r.metrics["nmse"] <= r.metrics["nmse_ema"]


def test_bf16_autocast_trains_finitely():
    r = Trainer(topk_cfg(), train_cfg(autocast="bf16"), SMALL).run()
    assert r.status == "ok" and 0 < r.metrics["nmse"] < 1.0


def test_flops_follow_the_readme_formula():
    r = Trainer(topk_cfg(), train_cfg(dead_window_tokens=10**9), SMALL).run()  # no dead latents: no AuxK
    d, n, k, B = 16, 64, 4, 256
    assert r.flops == pytest.approx(r.steps * B * (2 * d * n + 10 * d * k))


def test_save_load_round_trip(tmp_path):
    r = Trainer(topk_cfg(normalization="unit_norm"), train_cfg(), SMALL, tmp_path).run()
    sae = SAE.load(tmp_path)
    x = SMALL.eval_set()[:32]
    torch.testing.assert_close(sae.reconstruct(x), r.sae.reconstruct(x), rtol=0, atol=0)
    z = sae.encode(x)
    assert z.shape == (32, 64) and int((z != 0).sum(1).max()) <= 4
    code, stats = sae.encode_code(x)
    torch.testing.assert_close(sae.decode(z, stats), sae.reconstruct(x))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sae"]["k"] == 4 and "nmse" in saved["metrics"]


def test_recovers_ground_truth_features():
    src = SyntheticSource(d_in=32, n_features=128, active_per_vector=4, noise_std=0.01, seed=3, n_eval=2048)
    r = Trainer({"arch": "topk", "d_in": 32, "n_latents": 256, "k": 4, "normalization": "none"},
                {"train_tokens": 400_000, "batch_size": 1024, "lr": 2e-3, "dead_window_tokens": 20_000}, src).run()
    assert mmcs(r.sae.net.W_dec.detach(), src.features) >= 0.9


def test_latent_statistics_are_saved_with_the_sae_and_match_a_dense_reference(tmp_path):
    from sae_core.sae_files import LATENT_STATS_FILE, load_latent_stats

    r = Trainer(topk_cfg(), train_cfg(), SMALL, tmp_path).run()
    stats = load_latent_stats(tmp_path / LATENT_STATS_FILE)
    with torch.no_grad():
        z = SAE.load(tmp_path).encode(SMALL.eval_set()).double()
    active = z != 0
    torch.testing.assert_close(stats["frequency"], active.double().mean(0).float())
    mean_when_active = z.sum(0) / active.sum(0).clamp_min(1)
    torch.testing.assert_close(stats["mean_activation"], mean_when_active.float())
    assert r.metrics["dead_frac_eval"] == pytest.approx(float((stats["frequency"] == 0).double().mean()))
    assert r.metrics["l0"] == pytest.approx(float(stats["frequency"].double().sum()), rel=1e-6)


@pytest.mark.parametrize("arch", [{"arch": "topk", "k": 4}, {"arch": "relu"}])
def test_fitted_encoder_scale_is_the_least_squares_factor_of_the_initial_reconstruction(arch):
    src = SyntheticSource(d_in=16, n_features=64, seed=3)
    sae_cfg = {"d_in": 16, "n_latents": 128, **arch}
    train = {"train_tokens": 64, "batch_size": 32, "init_samples": 512}
    plain = Trainer(sae_cfg, {**train, "init_encoder_scale": 1.0}, src).start().sae.net
    fitted = Trainer(sae_cfg, {**train}, src).start().sae.net
    tripled = Trainer(sae_cfg, {**train, "init_encoder_scale": 3.0}, src).start().sae.net
    torch.testing.assert_close(tripled.W_enc, 3 * plain.W_enc)
    # float64 reference: the factor that minimises ||x - b_pre - s (x_hat - b_pre)||^2 on the init sample
    x = normalize(src.sample(512).double(), "unit_norm")[0]
    with torch.no_grad():
        r = plain.double().decode(plain.double().encode(x)) - plain.b_pre
        s = float(((x - plain.b_pre) * r).sum() / (r * r).sum())
        torch.testing.assert_close(fitted.W_enc.double(), s * plain.W_enc, rtol=1e-5, atol=1e-7)
        fitted = fitted.double()
        before = float((x - plain.b_pre - r).pow(2).sum())
        after = float((x - fitted.decode(fitted.encode(x))).pow(2).sum())
        baseline = float((x - plain.b_pre).pow(2).sum())
    assert s < 1 and after < before
    if arch["arch"] == "relu":  # the plain tied ReLU init reconstructs worse than b_pre alone; the fitted one better
        assert before > baseline > after


# --- recipes -------------------------------------------------------------------------------------
GAO2024 = {"batch_size": 131072, "ema_decay": 0.999, "init_encoder_scale": 1.0, "topk_select": "exact",
           "grad_clip": None, "lr": "auto"}


def test_recipe_gao2024_resolves_to_the_papers_values():
    from sae_core.config import RECIPES, parse_train_config

    assert RECIPES["gao2024"] == GAO2024
    default = parse_train_config({"train_tokens": 1000})
    paper = parse_train_config({"train_tokens": 1000, "recipe": "gao2024"})
    assert default.recipe == "default" and paper.recipe == "gao2024"
    assert {k: getattr(paper, k) for k in GAO2024} == GAO2024
    assert (default.batch_size, default.ema_decay, default.init_encoder_scale) == (4096, None, "fit")
    # every other key is the default's
    same = set(TrainConfig.model_fields) - set(GAO2024) - {"recipe"}
    assert {k: getattr(paper, k) for k in same} == {k: getattr(default, k) for k in same}
    # resolved: the dump names every value, and reads back to the same config
    assert parse_train_config(paper.model_dump()) == paper
    assert paper.model_dump()["batch_size"] == 131072


def test_recipe_yields_to_keys_set_explicitly_and_wins_over_the_familys_own_settings():
    from sae_core.config import parse_train_config, with_family_defaults

    cfg = parse_train_config({"train_tokens": 1000, "recipe": "gao2024", "batch_size": 256, "ema_decay": None})
    assert (cfg.batch_size, cfg.ema_decay, cfg.init_encoder_scale) == (256, None, 1.0)
    assert cfg.model_fields_set == {"train_tokens", "recipe", "batch_size", "ema_decay"}
    # a family's own training setting (JumpReLU's beta1 = 0) applies where neither the user nor the recipe set
    # the key: the recipe is a paper's whole setting (TopK's lr `horizon` yields to gao2024's `auto`)
    fam = with_family_defaults(cfg, {"adam_beta1": 0.0, "init_encoder_scale": 2.0, "batch_size": 8, "lr": "horizon"})
    assert (fam.adam_beta1, fam.init_encoder_scale, fam.batch_size, fam.lr) == (0.0, 1.0, 256, "auto")
    assert with_family_defaults(parse_train_config({"train_tokens": 1000}), {"lr": "horizon"}).lr == "horizon"
    # the trainer resolves it too, and the run's identity changes with what the recipe changes
    sae = topk_cfg()
    plain = Trainer(sae, {"train_tokens": 512, "batch_size": 256}, SMALL)
    paper = Trainer(sae, {"train_tokens": 512, "batch_size": 256, "recipe": "gao2024"}, SMALL)
    assert paper.cfg.ema_decay == 0.999 and paper.cfg.init_encoder_scale == 1.0
    assert (plain.cfg.lr, paper.cfg.lr) == ("horizon", "auto")
    assert plain.fingerprint != paper.fingerprint


@pytest.mark.parametrize("recipe", ["gao", "GAO2024", "paper"])
def test_unknown_recipe_is_refused_with_the_allowed_names(recipe):
    from sae_core.config import parse_train_config

    with pytest.raises(ConfigError) as err:
        parse_train_config({"train_tokens": 1000, "recipe": recipe}, source="sweep.yaml")
    msg = str(err.value)
    assert "sweep.yaml: train.recipe:" in msg and "'default'" in msg and "'gao2024'" in msg and recipe in msg


@pytest.mark.parametrize("kind", ["unit_norm", "standardize", "none"])
def test_input_rms_of_each_normalisation_reaches_the_step_context(kind):
    """sqrt(E||x||^2) of the normalised init sample: 1 (unit_norm), sqrt(d_in) (standardize), measured (none);
    kept in the trainer state (checkpoints) and handed to every loss."""
    trainer = Trainer(topk_cfg(normalization=kind), train_cfg(init_samples=2048), SMALL)
    session = trainer.start()
    x = normalize(SMALL.sample(2048).double(), kind)[0]
    measured = float(x.pow(2).sum(1).mean().sqrt())
    want = {"unit_norm": 1.0, "standardize": 4.0, "none": measured}[kind]
    assert session.state.input_rms == pytest.approx(want, rel=1e-9)
    assert measured == pytest.approx(want, rel=1e-6)  # the analytic values are what a measurement gives
    if kind == "none":
        assert not 0.9 < measured < 1.1  # the synthetic data is not unit-norm: the test can see the difference
    seen = {}
    arch = session.sae.net
    real = arch.loss
    arch.loss = lambda x, ctx: (seen.setdefault("rms", ctx.input_rms), real(x, ctx))[1]
    session.step(SMALL.train_batch(0, 256))
    assert seen["rms"] == session.state.input_rms


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_per_token_auxk_and_batchtopk_threshold_are_the_same_on_two_shards_by_two_replicas(arch):
    """AuxK normalised per token (each replica averages its rows; the trainer averages the replicas) and
    BatchTopK's post-training threshold (the cut over every shard's latents and every replica's rows) give the
    single process's SAE on S = 2 shards x R = 2 replicas."""
    from sae_core.parallel.launch import run_local_group, train_local

    src = SyntheticSource(d_in=16, n_features=64, n_eval=512, seed=0)
    sae_cfg = {"arch": arch, "d_in": 16, "n_latents": 256, "k": 2, "k_aux": 8, "normalization": "none",
               "aux_normalization": "token"}
    train = {"train_tokens": 256 * 8, "batch_size": 256, "lr": 1e-3, "init_samples": 512, "dead_window_tokens": 256,
             "topk_select": "exact", "ema_decay": 0.9}
    ref = Trainer(sae_cfg, train, src).run()
    assert any(row.get("aux_loss", 0) > 0 for row in ref.curve)
    out = run_local_group(train_local, 4, (2, sae_cfg, train, src))
    weights = out[0]["weights"]
    for k, v in ref.sae.net.state_dict().items():
        assert float((weights[k].double() - v.double()).abs().max()) < 1e-5, k
    for o in out:
        assert o["metrics"]["nmse"] == pytest.approx(ref.metrics["nmse"], abs=1e-6)
        assert [r.get("aux_loss", 0) for r in o["curve"]] == pytest.approx([r.get("aux_loss", 0) for r in ref.curve],
                                                                            abs=1e-5)
    if arch == "batchtopk":
        assert float(ref.sae.net.threshold) > 0 and float(weights["threshold"]) == pytest.approx(
            float(ref.sae.net.threshold), rel=1e-5)
