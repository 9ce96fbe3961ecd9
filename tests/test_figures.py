"""Figures (analysis/figures/): each draws the series its data hold, skips with a reason when they lack what it
needs, and render_all writes PNG + PDF from a sweep's store and leaves no figure open."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis import selection  # noqa: E402
from analysis.figures import SkipFigure  # noqa: E402
from analysis.figures.data import pareto  # noqa: E402
from analysis.figures.style import paper_figure  # noqa: E402
from analysis.sweep_fits import fit_runs  # noqa: E402
from orchestrator.store import RUN_SCHEMA, ResultsStore  # noqa: E402
from sae_core.sae import SAE  # noqa: E402

NS = [256, 512, 1024, 2048]
KS = [8, 16]
L1S = [1e-3, 3e-3, 1e-2]
D_IN = 64


def _row(run_id, arch, n, k=None, l1=None, lr=1e-3, seed=0, **metrics):
    return {"run_id": run_id, "sweep": "synthetic", "status": "ok", "arch": arch, "n_latents": n, "k": k,
            "l1_coeff": l1, "lr": lr, "seed": seed, "model": "gpt2", "hook": "resid_post", "layer": 6, "d_in": D_IN,
            **metrics}


def synthetic():
    """runs, curves, recovery, layers: TopK k in {8, 16} x n in NS (eq. 3-like nmse), ReLU 3 l1 x n in {256,
    1024}, an lr sweep (3 lrs) at k=8 for n 256 and 1024, a multi-layer TopK run; ΔCE downstream columns;
    power-law curves at log-spaced tokens; progressive recovery for two runs; per-layer rows."""
    rng = np.random.default_rng(0)
    rows = []
    for k in KS:
        for n in NS:
            nmse = np.exp(-0.5 + 0.26 * np.log(k) - 0.017 * np.log(n) - 0.042 * np.log(k) * np.log(n)) \
                + np.exp(-1.32 - 0.085 * np.log(k))
            nmse *= np.exp(0.005 * rng.standard_normal())
            rows.append(_row(f"topk_k{k}_n{n}", "topk", n, k=k, nmse=nmse, l0=k * 0.98, dead_frac=0.02 * n / 256))
    for l1 in L1S:
        for n in (256, 1024):
            l0 = 40 * (1e-3 / l1) ** 0.5 * (n / 256) ** 0.1
            rows.append(_row(f"relu_l{l1}_n{n}", "relu", n, l1=l1, nmse=0.9 * l0 ** -0.35 * (n / 256) ** -0.05,
                             l0=l0, dead_frac=0.1))
    for n in (256, 1024, 2048):  # the lr sweep: lr 1e-3 is the grid's run, two more lrs, both worse
        for lr in (3e-4, 3e-3):
            base = next(r for r in rows if r["run_id"] == f"topk_k8_n{n}")
            rows.append(_row(f"topk_k8_n{n}_lr{lr}", "topk", n, k=8, lr=lr, nmse=base["nmse"] * 1.2,
                             l0=7.9, dead_frac=0.3))
    for r in rows:
        r["tokens"] = int(1.6e7)
        r["flops"] = 6.0 * D_IN * r["n_latents"] * r["tokens"]
        r["downstream_metric"] = "ce"
        r["downstream_loss"] = 2.0 * r["nmse"]
        r["downstream_kl"] = 1.5 * r["nmse"]
    rows.append({**_row("mlsae", "topk", 1024, k=8, nmse=0.2, l0=8, dead_frac=0.0, tokens=int(1.6e7),
                        flops=1e12, downstream_metric="ce", downstream_loss=0.3), "layer": None})
    runs = pd.DataFrame(rows)
    for c in ("k", "layer", "tokens", "n_latents", "seed"):
        runs[c] = runs[c].astype("Int64")

    curves = []
    for r in rows:
        tokens = np.geomspace(1e4, r["tokens"], 10)
        nmse = r["nmse"] + 0.5 * (tokens / 1e4) ** -0.5
        curves += [{"run_id": r["run_id"], "step": i, "tokens": t, "flops": t * 6.0 * D_IN * r["n_latents"],
                    "nmse": v, "l0": r["l0"], "dead_frac": 0.0, "lr": r["lr"]}
                   for i, (t, v) in enumerate(zip(tokens, nmse))]
    curves = pd.DataFrame(curves)

    recovery = []
    for rid, scale in (("topk_k8_n2048", 1.0), ("relu_l0.003_n1024", 0.6)):
        for kk in (1, 2, 4, 8, 16, 32):
            recovery.append({"run_id": rid, "activation": "topk", "k": kk, "threshold": None, "l0": kk,
                             "nmse": scale * 0.5 * kk ** -0.4, "mse": 0.1, "downstream_loss": kk ** -0.4,
                             "downstream_kl": 0.1})
            recovery.append({"run_id": rid, "activation": "jumprelu", "k": None, "threshold": 1.0 / kk, "l0": kk * 1.1,
                             "nmse": scale * 0.55 * kk ** -0.4, "mse": 0.1, "downstream_loss": 1.1 * kk ** -0.4,
                             "downstream_kl": 0.1})
    recovery = pd.DataFrame(recovery)
    layers = pd.DataFrame([{"run_id": "mlsae", "layer": i, "nmse": 0.1 + 0.03 * i, "mse": 0.01, "l0": 8.0, "l1": 1.0,
                            "downstream_loss": 0.1 * (i + 1), "downstream_kl": 0.05} for i in range(4)])
    return runs, curves, recovery, layers


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(autouse=True)
def no_leaks():
    yield
    plt.close("all")


def lines(fig_or_ax, gid):
    axes = fig_or_ax.axes if hasattr(fig_or_ax, "axes") and not hasattr(fig_or_ax, "lines") else [fig_or_ax]
    return [ln for ax in axes for ln in ax.lines if ln.get_gid() == gid]


def legend_texts(ax):
    """The axes' legend entries, or those of its figure's legend (fit formulas go below the figure)."""
    legends = [ax.get_legend()] if ax.get_legend() else ax.figure.legends
    return [t.get_text().replace("\n    ", " ") for leg in legends for t in leg.get_texts()]


def single_site(runs):
    return runs[runs.run_id != "mlsae"]


# ---------------------------------------------------------------- each figure draws its series

def test_loc_draws_every_curve_the_frontier_and_one_fit_per_k(data):
    runs, curves, _, _ = data
    topk = single_site(runs)[lambda d: (d.arch == "topk") & (d.lr == 1e-3)]
    fig = F.fig_loc(curves, topk)
    ax = fig.axes[0]
    assert len(lines(ax, "curve")) == 8  # every run's curve
    assert len(lines(ax, "frontier")) == 2 and len(lines(ax, "fit")) == 2  # per k
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    fits = [t for t in legend_texts(ax) if "C^" in t]
    assert len(fits) == 2 and all(t.startswith("k=") for t in fits)
    # the frontier is below every curve at its flops
    front = lines(ax, "frontier")[0]
    assert np.all(np.diff(front.get_ydata()) < 0)


def test_lofn_joint_fit_curve_per_k_over_points(data):
    runs = data[0]
    fig = F.fig_lofn(runs)
    ax = fig.axes[0]
    pts, fits = lines(ax, "points"), lines(ax, "fit")
    assert len(pts) == 2 and len(fits) == 2  # TopK k in {8, 16}; the ReLU runs are left out
    assert [len(p.get_xdata()) for p in pts] == [4, 4]  # the lr sweep's worse runs are left out
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    texts = legend_texts(ax)
    assert any(t.startswith("topk L(n,k): L = exp(") for t in texts)
    assert "other site" in ax.get_title() and "best lr" in ax.get_title()
    # the fitted curve goes through its points
    for p, f in zip(pts, fits):
        x, y = np.asarray(p.get_xdata(), float), np.asarray(p.get_ydata(), float)
        fy = np.interp(np.log(x), np.log(f.get_xdata()), f.get_ydata())
        assert np.allclose(fy, y, rtol=0.05)


def test_lofn_falls_back_to_per_k_lofn_and_per_arch(data):
    runs = single_site(data[0])
    three_n = runs[(runs.arch == "topk") & (runs.n_latents <= 1024)]
    fig = F.fig_lofn(three_n)  # 2 k x 3 n = 6 cells < 7: no joint law, an L(N) per k
    fits = lines(fig.axes[0], "fit")
    assert len(fits) == 2 and sum("k=" in t and "·n^" in t for t in legend_texts(fig.axes[0])) == 2
    fig = F.fig_lofn(runs[runs.arch == "relu"])  # no TopK: per l1_coeff, only 2 widths each: joined points
    assert len(lines(fig.axes[0], "points")) == 3 and len(lines(fig.axes[0], "guide")) == 3
    assert lines(fig.axes[0], "fit") == []


def test_lofn_shows_unconverged_runs_hollow_and_fits_without_them(data):
    runs = single_site(data[0])
    runs = runs[(runs.arch == "topk") & (runs.k == 8) & (runs.lr == 1e-3)].assign(converged=True)
    fig = F.fig_lofn(runs.assign(converged=runs.n_latents != 2048))
    ax = fig.axes[0]
    late = lines(ax, "unconverged")
    assert len(late) == 1 and list(late[0].get_xdata()) == [2048] and late[0].get_markerfacecolor() == "none"
    assert list(lines(ax, "points")[0].get_xdata()) == [256, 512, 1024]
    assert "not converged" in legend_texts(ax)
    (fit,) = lines(ax, "fit")  # L(N) through the 3 converged widths
    assert "n^" in fit.get_label()
    fig = F.fig_lofn(runs.assign(converged=False))  # nothing converged: the law at the token budget, said so
    (fit,) = lines(fig.axes[0], "fit")
    assert "at the token budget, not converged" in fit.get_label()
    fig = F.fig_lofn(runs[runs.n_latents < 1024])  # two widths: points joined, no fit, and why
    assert lines(fig.axes[0], "fit") == [] and len(lines(fig.axes[0], "guide")) == 1
    assert "no fit: needs at least 3 distinct n_latents, got 2" in fig.axes[0].get_title()


def test_frontier_one_envelope_per_arch_at_one_width(data):
    fig = F.fig_frontier(data[0])
    ax = fig.axes[0]
    fronts = lines(ax, "frontier")
    assert len(fronts) == 2 and sorted(legend_texts(ax)) == ["relu", "topk"]
    assert "n = 1024" in ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    for f in fronts:  # a Pareto frontier: L0 up, nmse down
        assert np.all(np.diff(f.get_xdata()) > 0) and np.all(np.diff(f.get_ydata()) < 0)
    relu = next(f for f in fronts if f.get_label() == "relu")
    assert len(relu.get_xdata()) == 3


def test_pareto_drops_dominated_points():
    x, y = pareto(np.array([1, 2, 3, 4, 5.0]), np.array([0.5, 0.6, 0.4, 0.45, 0.1]))
    assert x.tolist() == [1, 3, 5] and y.tolist() == [0.5, 0.4, 0.1]


def test_nmse_vs_n_series_per_k_and_best_relu(data):
    fig = F.fig_nmse_vs_n(data[0])
    ax = fig.axes[0]
    series = lines(ax, "series")
    assert [s.get_label() for s in series] == ["topk k=8", "topk k=16", "relu (best over λ)"]
    assert [len(s.get_xdata()) for s in series] == [4, 4, 2]
    relu = single_site(data[0]).query("arch == 'relu'").groupby("n_latents").nmse.min()
    assert np.allclose(series[2].get_ydata(), relu.to_numpy())
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_lr_series_per_n_annotated_with_tokens(data):
    fig = F.fig_lr(data[0][lambda d: (d.arch == "topk") & (d.k == 8)])
    ax = fig.axes[0]
    series = lines(ax, "series")
    assert [s.get_label() for s in series] == ["n=256", "n=1024", "n=2048"]
    assert all(len(s.get_xdata()) == 3 for s in series)
    tokens = [t for t in ax.texts if t.get_gid() == "tokens"]
    assert len(tokens) == 9 and {t.get_text() for t in tokens} == {"16M"}
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    best = lines(ax, "best_lr")
    assert len(best) == 1 and best[0].get_label().startswith("best lr: lr* = ")
    assert np.allclose(best[0].get_xdata(), 1e-3, rtol=0.3)  # the grid's minimum


def test_downstream_two_panels_labelled_by_metric(data):
    fig = F.fig_downstream(data[0])
    left, right = fig.axes
    assert left.get_ylabel() == "ΔCE (nats/token)"
    assert len(lines(left, "frontier")) == 2 and len(lines(right, "series")) == 3
    assert left.get_xscale() == "log" and right.get_xscale() == "log"
    enc = data[0].assign(downstream_metric="embedding_cosine")
    assert F.fig_downstream(enc).axes[0].get_ylabel() == "1 − cos(pooled embedding)"


def test_dead_fraction_vs_n(data):
    fig = F.fig_dead(data[0])
    ax = fig.axes[0]
    assert len(lines(ax, "series")) == 3 and ax.get_xscale() == "log"
    k8 = lines(ax, "series")[0]
    assert np.allclose(k8.get_ydata(), [0.02 * n / 256 for n in NS])  # the best-lr runs, not the lr sweep's


def test_recovery_solid_and_dashed_line_per_run(data):
    runs, _, recovery, _ = data
    fig = F.fig_recovery(recovery, runs)
    ax = fig.axes[0]
    topk, jump = lines(ax, "topk"), lines(ax, "jumprelu")
    assert len(topk) == 2 and len(jump) == 2
    assert all(ln.get_linestyle() == "-" for ln in topk) and all(ln.get_linestyle() == "--" for ln in jump)
    assert [ln.get_color() for ln in topk] == [ln.get_color() for ln in jump]
    assert len(lines(ax, "trained")) == 2
    assert {"TopK(k′)", "JumpReLU(θ)"} <= set(legend_texts(ax))
    assert len(fig.axes) == 2  # the recovery table has downstream_loss: a second panel
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_recovery_keeps_at_most_six_runs_the_widest_of_each_series(data):
    runs = single_site(data[0])
    runs = pd.concat([runs, runs[runs.arch == "relu"].assign(arch="gated", run_id=lambda d: "g" + d.run_id)])
    template = data[2][data[2].run_id == "topk_k8_n2048"]
    rec = pd.concat([template.assign(run_id=r) for r in runs.run_id])
    fig = F.fig_recovery(rec, runs)  # 8 series: topk k=8, 16, relu and gated x 3 l1 -> 6 shown
    solid = lines(fig.axes[0], "topk")
    assert len(solid) == 6 and len(lines(fig.axes[0], "jumprelu")) == 6
    labels = [ln.get_label() for ln in solid]
    assert "topk n=2048 k=8" in labels and all(" n=1024 " in t for t in labels if not t.startswith("topk"))


def test_a_figure_that_fails_midway_closes_what_it_opened():
    @paper_figure
    def broken():
        plt.subplots()
        raise SkipFigure("half drawn")
    with pytest.raises(SkipFigure, match="half drawn"):
        broken()
    assert plt.get_fignums() == []


def test_curves_panel_per_arch_colored_by_n(data):
    runs, curves, _, _ = data
    fig = F.fig_curves(curves, runs)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["topk", "relu"]
    assert len(lines(panels[0], "curve")) == 14 and len(lines(panels[1], "curve")) == 6
    assert panels[0].get_xscale() == "log" and panels[0].get_yscale() == "log"
    colors = {tuple(ln.get_color()) for ln in lines(panels[0], "curve")}
    assert len(colors) == 4  # one per n
    assert sorted(legend_texts(panels[1])) == ["λ=0.001", "λ=0.003", "λ=0.01"]


def test_layers_one_series_per_run(data):
    runs, _, _, layers = data
    two = pd.concat([layers, layers.assign(run_id="mlsae2", nmse=layers.nmse * 0.8)])
    runs2 = pd.concat([runs, runs[runs.run_id == "mlsae"].assign(run_id="mlsae2", n_latents=4096)])
    fig = F.fig_layers(two, runs2)
    assert len(fig.axes) == 2
    nmse_ax = fig.axes[0]
    series = lines(nmse_ax, "series")
    assert [s.get_label() for s in series] == ["n=1024", "n=4096"]
    assert series[0].get_xdata().tolist() == [0, 1, 2, 3]


def test_a_new_architecture_reaches_fits_and_figures_through_its_class(data, monkeypatch):
    """Families the analysis has no list of: their sparsity key and whether k sets their L0 come from the
    class alone (Architecture.sparsity_keys, l0_set_by_k)."""
    known = selection.registry()
    monkeypatch.setattr(selection, "registry", lambda: {
        **known, "newfam": type("NewFamily", (), {"sparsity_keys": ("lam",), "l0_set_by_k": False}),
        "newk": type("NewK", (), {"sparsity_keys": ("k",), "l0_set_by_k": True})})
    runs = single_site(data[0])
    relu, topk = runs[runs.arch == "relu"], runs[runs.arch == "topk"]
    runs = pd.concat([runs, relu.assign(arch="newfam", lam=relu.l1_coeff, l1_coeff=None, run_id="n" + relu.run_id),
                      topk.assign(arch="newk", run_id="k" + topk.run_id)])
    series = [s.get_label() for s in lines(F.fig_nmse_vs_n(runs).axes[0], "series")]
    assert series[2:4] == ["newk k=8", "newk k=16"] and series[-1] == "newfam (best over lam)"
    fits, skipped = fit_runs(runs, n_boot=0)
    assert "L(n,k) arch=newk" in fits and not any(name.startswith("L(n,k) arch=newfam") for name in fits)
    assert {name for name in skipped if "newfam" in name} == {f"L(N) arch=newfam, lam={v}" for v in L1S}
    assert any(t.startswith("newk L(n,k): ") for t in legend_texts(F.fig_lofn(runs).axes[0]))


def test_ablation_sparsity_error_bars_per_family_and_the_channel_baseline(data):
    runs = single_site(data[0])
    runs = runs.assign(ablation_sparsity=0.5 / np.sqrt(runs.l0), ablation_sparsity_se=0.01,
                       ablation_sparsity_baseline=0.6 + 0.01 * (runs.n_latents > 512))
    fig = F.fig_ablation_sparsity(runs)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.get_label() in ("topk", "relu")]
    assert sorted(c.get_label() for c in bars) == ["relu", "topk"] and all(c.has_yerr for c in bars)
    (base,) = lines(ax, "baseline")
    assert base.get_ydata()[0] == pytest.approx(runs.ablation_sparsity_baseline.mean(), abs=0.01)
    assert "residual channels (baseline)" in legend_texts(ax)
    with pytest.raises(SkipFigure, match="no run has ablation_sparsity"):
        F.fig_ablation_sparsity(runs.assign(ablation_sparsity=np.nan))


# ---------------------------------------------------------------- skips

def test_figures_skip_with_a_reason_when_data_lack_what_they_need(data):
    runs, curves, recovery, layers = data
    one_lr = runs[runs.run_id.str.contains("_lr") == False]  # noqa: E712
    with pytest.raises(SkipFigure, match="at least 2 learning rates"):
        F.fig_lr(one_lr)
    with pytest.raises(SkipFigure, match="downstream_loss is null for every run: no model"):
        F.fig_downstream(runs.assign(downstream_loss=np.nan, downstream_null_reason="no model"))
    with pytest.raises(SkipFigure, match="no training curves"):
        F.fig_loc(curves.iloc[:0], runs)
    with pytest.raises(SkipFigure, match="no training curves"):
        F.fig_curves(pd.DataFrame(), runs)
    with pytest.raises(SkipFigure, match="2 widths"):
        F.fig_nmse_vs_n(runs[runs.n_latents == 1024])
    with pytest.raises(SkipFigure, match="2 widths"):
        F.fig_lofn(runs[runs.n_latents == 1024])
    with pytest.raises(SkipFigure, match="2 runs of different L0"):
        F.fig_frontier(runs[(runs.arch == "topk") & (runs.k == 8)])
    with pytest.raises(SkipFigure, match="2 widths"):
        F.fig_dead(runs[runs.n_latents == 256])
    with pytest.raises(SkipFigure, match="no progressive-recovery table"):
        F.fig_recovery(recovery.iloc[:0], runs)
    with pytest.raises(SkipFigure, match="no per-layer table"):
        F.fig_layers(layers.iloc[:0], runs)
    with pytest.raises(SkipFigure, match="status ok"):
        F.fig_frontier(runs.assign(status="diverged"))
    with pytest.raises(SkipFigure, match="no finished runs"):
        F.fig_nmse_vs_n(runs.iloc[:0])
    assert plt.get_fignums() == []  # a skip leaves nothing open


def test_family_skips_without_saes(tmp_path, data):
    with pytest.raises(SkipFigure, match="SAE folders missing"):
        F.fig_width_ladder(tmp_path, data[0])
    with pytest.raises(SkipFigure, match="differ only in n_latents"):
        F.fig_width_ladder(tmp_path, data[0][data[0].n_latents == 256])


def _write_latent_stats(saes_dir, run_id, n, importance=True, seed=0):
    """A hand-written latent_stats file: log-normal densities (Gao et al. App. E.4), 3 latents that never fire."""
    import torch
    from safetensors.torch import save_file

    from sae_core.sae_files import LATENT_STATS_FILE
    g = torch.Generator().manual_seed(seed)
    freq = (10 ** (-2 + 0.5 * torch.randn(n, generator=g))).clamp(max=1.0)
    freq[:3] = 0.0
    tensors = {"frequency": freq, "mean_activation": torch.rand(n, generator=g) * (freq > 0)}
    if importance:
        tensors["mean_sq_activation"] = freq * tensors["mean_activation"] ** 2
    (saes_dir / run_id).mkdir(parents=True, exist_ok=True)
    save_file(tensors, saes_dir / run_id / LATENT_STATS_FILE)


def test_latent_density_one_histogram_per_topk_run_at_the_most_common_k(tmp_path, data):
    runs = data[0]
    saes = tmp_path / "saes"
    for n in (256, 1024):  # k=8 has the most runs (its lr sweep); the runs at best lr are the grid's
        _write_latent_stats(saes, f"topk_k8_n{n}", n, importance=n == 1024, seed=n)
    _write_latent_stats(saes, "topk_k16_n512", 512)  # another k: not shown
    _write_latent_stats(saes, "topk_k8_n256_lr0.003", 256)  # a worse lr: not shown
    fig = F.fig_latent_density(tmp_path, runs)
    density, importance = fig.axes[:2]
    hists = [[p for p in ax.patches if p.get_gid() == "hist"] for ax in (density, importance)]
    assert len(hists[0]) == 2 and len(hists[1]) == 1  # the older file of n=256 has no E[z²]
    assert legend_texts(density) == ["n=256 (3 never fire)", "n=1024 (3 never fire)"]
    assert hists[0][0].get_edgecolor() != hists[0][1].get_edgecolor()  # colored by width
    assert "k=8" in fig._suptitle.get_text() and "log10 latent density" in density.get_xlabel()


def test_latent_density_skips_without_latent_stats(tmp_path, data):
    with pytest.raises(SkipFigure, match="no TopK run at k=8 has latent_stats.safetensors"):
        F.fig_latent_density(tmp_path, data[0])
    with pytest.raises(SkipFigure, match="no ok TopK run"):
        F.fig_latent_density(tmp_path, data[0][data[0].arch == "relu"])
    assert plt.get_fignums() == []


# ---------------------------------------------------------------- render_all on a real store

def test_render_all_writes_supported_figures_and_lists_skips(tmp_path):
    store = ResultsStore(tmp_path, "tiny")
    store.save_spec("name: tiny\n")
    for n, nmse in ((16, 0.4), (32, 0.3)):
        rid = f"topk_n{n}"
        SAE({"arch": "topk", "d_in": 8, "n_latents": n, "k": 2}).save(store.sae_dir(rid))
        tokens = np.geomspace(1e3, 1e5, 6)
        curve = [{"step": i, "tokens": int(t), "flops": float(t * 6 * 8 * n), "nmse": nmse + (t / 1e3) ** -0.5,
                  "l0": 2.0, "dead_frac": 0.0, "lr": 1e-3} for i, t in enumerate(tokens)]
        recovery = [{"activation": act, "k": kk if act == "topk" else None, "threshold": None if act == "topk" else 0.1,
                     "l0": float(kk), "nmse": nmse * kk ** -0.3, "mse": 0.1, "downstream_loss": None,
                     "downstream_kl": None} for act in ("topk", "jumprelu") for kk in (1, 2, 4)]
        row = {"run_id": rid, "sweep": "tiny", "status": "ok", "arch": "topk", "n_latents": n, "k": 2, "lr": 1e-3,
               "seed": 0, "layer": 0, "d_in": 8, "tokens": int(1e5), "flops": float(1e5 * 48 * n), "nmse": nmse,
               "mse": 0.1, "l0": 2.0, "l1": 1.0, "dead_frac": 0.05, "dead_frac_eval": 0.05,
               "downstream_metric": None, "downstream_loss": None, "downstream_null_reason": "activations from a file"}
        store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row, curve=curve, tables={"recovery": recovery})
    out = tmp_path / "figs"
    result = F.render_all(store.dir, out)
    assert [name for name, _, _ in result] == list(F.FIGURES)
    drawn = {name: paths for name, paths, reason in result if paths}
    skipped = {name: reason for name, paths, reason in result if paths is None}
    assert set(drawn) == {"loc", "lofn", "nmse_vs_n", "dead", "recovery", "curves", "width_ladder"}
    for paths in drawn.values():
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
        assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
    assert skipped["downstream"] == "downstream_loss is null for every run: activations from a file"
    assert "learning rates" in skipped["lr"] and "per-layer" in skipped["layers"]
    assert "L0" in skipped["frontier"]
    assert "latent_stats" in skipped["latent_density"]  # SAE.save alone writes no latent stats
    assert all(reason for reason in skipped.values())
    assert not list(out.glob(".*tmp"))  # no temporary file left
    assert plt.get_fignums() == []
    # default folder: <sweep>/figures
    F.render_all(store.dir, names=["nmse_vs_n"])
    assert (store.dir / "figures" / "nmse_vs_n.png").is_file()
