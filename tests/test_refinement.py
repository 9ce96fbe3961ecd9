"""Activation refinement (Gao et al. 2024, §5.1, Fig. 9) against known answers: it never raises the error, it
undoes a planted shrinkage exactly, and it agrees with scipy's per-vector NNLS."""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from sae_core.evaluation.reconstruction import evaluate
from sae_core.evaluation.refinement import nnls, refine
from sae_core.sae import SAE

FAMILIES = {"topk": {"k": 6}, "batchtopk": {"k": 6}, "relu": {}, "gated": {}, "jumprelu": {}, "prolu": {},
            "multi_topk": {"k": 6}}


def random_sae(arch: str, d=24, n=48, seed=0, normalization="unit_norm") -> SAE:
    sae = SAE({"arch": arch, "d_in": d, "n_latents": n, "normalization": normalization, **FAMILIES[arch]},
              init_seed=seed)
    with torch.no_grad():  # a nonzero b_pre and some negative encoder biases: sparser, less symmetric codes
        g = torch.Generator().manual_seed(seed + 1)
        sae.net.b_pre.copy_(0.1 * torch.randn(d, generator=g))
        for name, p in sae.net.named_parameters():
            if name in ("b_enc", "b_gate", "b_mag"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g) - 0.02)
    return sae


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("normalization", ["unit_norm", "none"])
def test_refinement_never_raises_nmse(arch, normalization):
    sae = random_sae(arch, normalization=normalization)
    x = torch.randn(300, 24) * 3 + 1
    res = refine(sae, x, batch_size=128)
    m = res.metrics
    # the runs' nmse, same units (same batches: an unfinalized BatchTopK selects per batch)
    assert m["nmse"] == pytest.approx(evaluate(sae, x, batch_size=128).metrics["nmse"], rel=1e-5)
    assert m["refined_nmse"] <= m["nmse"] + 1e-12
    assert (res.refined[~res.active] == 0).all() and (res.refined >= 0).all()
    capped = refine(sae, x, max_active=3)  # the cap keeps the other latents frozen: still never worse
    assert capped.metrics["refined_nmse"] <= capped.metrics["nmse"] + 1e-12
    assert capped.active.sum(1).max() <= 3


def planted(d=32, n=16, k=4, rows=200, seed=0):
    """An SAE with orthonormal decoder rows whose encoder returns half the true codes: shrunk by 0.5."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W = q[:n].float()  # [n, d], orthonormal rows
    sae = SAE({"arch": "topk", "d_in": d, "n_latents": n, "k": k, "normalization": "none"}, init_seed=0)
    with torch.no_grad():
        sae.net.W_dec.copy_(W)
        sae.net.W_enc.copy_(0.5 * W)
        sae.net.b_pre.copy_(torch.randn(d, generator=g))
        sae.net.b_enc.zero_()
    z = torch.zeros(rows, n)
    for i in range(rows):
        on = torch.randperm(n, generator=g)[:k]
        z[i, on] = torch.rand(k, generator=g) + 0.5
    return sae, z, z @ W + sae.net.b_pre.detach()


def test_planted_shrinkage_is_undone():
    sae, z_true, x = planted()
    res = refine(sae, x)
    dense = torch.zeros(x.shape[0], 16, dtype=torch.float64)
    dense.scatter_(1, res.latents, res.refined)
    assert torch.allclose(dense, z_true.double(), atol=1e-4)
    assert torch.allclose(res.original[res.active], 0.5 * res.refined[res.active], atol=1e-4)
    assert res.metrics["shrinkage"] == pytest.approx(0.5, abs=1e-4)
    assert res.metrics["refinement_mean"] == pytest.approx(float(0.5 * z_true[z_true > 0].mean()), abs=1e-4)
    assert res.metrics["refined_nmse"] < 1e-8 < res.metrics["nmse"]


def test_no_shrinkage_when_codes_are_exact():
    sae, z_true, x = planted()
    with torch.no_grad():
        sae.net.W_enc.copy_(sae.net.W_dec)
    m = refine(sae, x).metrics
    assert m["shrinkage"] == pytest.approx(1.0, abs=1e-4) and abs(m["refinement_mean"]) < 1e-4


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_matches_a_float64_scipy_reference(arch):
    sae = random_sae(arch, d=20, n=40, seed=3)
    x = torch.randn(60, 20, generator=torch.Generator().manual_seed(5)) * 2
    res = refine(sae, x)
    code, _ = sae.encode_code(x)
    z = sae.net.dense_latents(code).double()
    xn = sae.normalize(x)[0].double()
    W, b = sae.net.W_dec.detach().double(), sae.net.b_pre.detach().double()
    checked = 0
    for i in range(x.shape[0]):
        S = res.latents[i][res.active[i]]
        assert set(S.tolist()) == set(z[i].nonzero().squeeze(1).tolist())  # the active set: all nonzero latents
        if len(S) == 0:
            continue
        D = W[S]  # [s, d]
        expect, _ = scipy_nnls(D.T.numpy(), (xn[i] - b).numpy())
        np.testing.assert_allclose(res.refined[i][res.active[i]].numpy(), expect, atol=1e-4)
        checked += 1
    assert checked > 30


def test_nnls_matches_scipy_where_most_of_the_start_must_leave_the_free_set():
    """An L1 code's case: every latent starts free and the unconstrained solve puts many below 0, so rows take
    the clipped step (all of them fixed at once) as well as Lawson and Hanson's one-at-a-time step."""
    g = torch.Generator().manual_seed(0)
    r, m, d = 40, 64, 96
    D = torch.randn(r, m, d, generator=g, dtype=torch.float64)
    t = torch.randn(r, d, generator=g, dtype=torch.float64)  # not a nonnegative code's: about half go below 0
    mask = torch.rand(r, m, generator=g) < 0.9
    z0 = torch.rand(r, m, generator=g, dtype=torch.float64) * mask
    G, c = D @ D.transpose(1, 2), (D @ t.unsqueeze(-1)).squeeze(-1)
    unconstrained = torch.linalg.solve(G[0][mask[0]][:, mask[0]], c[0][mask[0]])
    assert (unconstrained < 0).sum() > 10
    got = nnls(G, c, z0, mask)
    for i in range(r):
        expect, _ = scipy_nnls(D[i][mask[i]].T.numpy(), t[i].numpy())
        np.testing.assert_allclose(got[i][mask[i]].numpy(), expect, atol=1e-9)
        assert (got[i][~mask[i]] == 0).all()


# ---------------------------------------------------------------- integration: runs columns and the figure

def test_evaluate_run_adds_the_refinement_columns():
    from sae_core.evaluation.run import EvalConfig, evaluate_run

    sae = random_sae("relu", d=16, n=32)
    x = torch.randn(500, 16)
    cfg = EvalConfig(downstream=False, recovery=False, refinement_vectors=200)
    m = evaluate_run(sae, x, cfg, [], None).metrics
    expect = refine(sae, x[:200]).metrics
    for key in ("refined_nmse", "shrinkage", "refinement_mean"):
        assert m[key] == pytest.approx(expect[key], rel=1e-9)
    # a multi-layer SAE: its vectors of every layer pooled (the first refinement_vectors of them)
    layer_ids = torch.arange(500) % 2
    ml = evaluate_run(sae, x, cfg, [0, 1], None, layer_ids=layer_ids).metrics
    assert ml["refined_nmse"] == pytest.approx(expect["refined_nmse"], rel=1e-9)
    off = evaluate_run(sae, x, cfg.model_copy(update={"refinement": False}), [], None).metrics
    assert all(off[k] is None for k in ("refined_nmse", "shrinkage", "refinement_mean"))


def _figure_runs():
    import pandas as pd

    rows = []
    for arch, sizes, refined, shrink in (("topk", (8, 16, 32), 0.97, 1.0), ("relu", (10, 20, 40), 0.8, 0.7)):
        for n in (256, 1024):
            for l0 in sizes:
                nmse = 0.5 * l0 ** -0.3 * (1.2 if arch == "relu" else 1.0)
                rows.append({"run_id": f"{arch}{l0}_{n}", "sweep": "s", "status": "ok", "arch": arch, "n_latents": n,
                             "k": l0 if arch == "topk" else None, "l1_coeff": None if arch == "topk" else 1 / l0,
                             "lr": 1e-3, "seed": 0, "model": "m", "hook": "resid_post", "layer": 6, "d_in": 64,
                             "nmse": nmse, "l0": float(l0), "refined_nmse": refined * nmse, "shrinkage": shrink,
                             "refinement_mean": 1 - shrink})
    runs = pd.DataFrame(rows)
    runs["k"] = runs["k"].astype("Int64")
    return runs


def test_shrinkage_figure_draws_both_panels_per_family():
    import matplotlib.pyplot as plt

    from analysis.figures import FIGURES, SkipFigure, fig_shrinkage

    assert FIGURES["shrinkage"] is fig_shrinkage
    runs = _figure_runs()
    fig = fig_shrinkage(runs)
    ax, ax2 = fig.axes[:2]
    solid = [ln for ln in ax.lines if ln.get_gid() == "nmse"]
    dashed = [ln for ln in ax.lines if ln.get_gid() == "refined"]
    assert len(solid) == len(dashed) == 2 and all(ln.get_linestyle() == "--" for ln in dashed)
    for s, r in zip(solid, dashed):  # refined below original at every L0
        assert (np.asarray(r.get_ydata()) < np.asarray(s.get_ydata())).all()
    shrink = {ln.get_label(): ln.get_ydata() for ln in ax2.lines if ln.get_gid() == "shrinkage"}
    assert set(shrink) == {"topk", "relu"} and np.allclose(shrink["relu"], 0.7)
    assert "n = 1024" in fig._suptitle.get_text()  # one width, as fig_frontier picks it
    plt.close(fig)
    with pytest.raises(SkipFigure, match="refined_nmse"):
        fig_shrinkage(runs.drop(columns=["refined_nmse", "shrinkage"]))
    with pytest.raises(SkipFigure, match="refined_nmse"):
        fig_shrinkage(runs.assign(refined_nmse=np.nan))
    assert plt.get_fignums() == []
