"""Cross-layer analyses of a multi-layer SAE (sae_core.evaluation.cross_layer) against known answers: a latent
planted at one layer, exact histograms of a hand-made mass matrix, dense float64 references for the mass and
the adjacent-layer cosine, and the tables evaluate_run returns only for multi-layer SAEs."""
from __future__ import annotations

import math

import pytest
import torch

from sae_core.evaluation.cross_layer import adjacent_cosine, layer_mass, spread
from sae_core.evaluation.run import RUN_TABLES, EvalConfig, evaluate_run
from sae_core.sae import SAE

LAYERS = [0, 1, 2, 3]


def planted() -> tuple[SAE, torch.Tensor, torch.Tensor]:
    """TopK (k = 2) with the identity encoder on 4 layers of 8 vectors each: layer l's vectors are 3 e_l + e_3
    (layer 3: 3 e_3 + e_0), so latent 2 fires only at layer 2 (and latent 1 only at 1), latent 0 at layers 0
    and 3 (masses 3 : 1), latent 3 at every layer (masses 1 : 1 : 1 : 3)."""
    sae = SAE({"arch": "topk", "d_in": 4, "n_latents": 4, "k": 2, "normalization": "none"})
    with torch.no_grad():
        sae.net.W_enc.copy_(torch.eye(4))
        sae.net.b_enc.zero_()
        sae.net.b_pre.zero_()
    eye = torch.eye(4)
    rows = [3 * eye[layer] + (eye[0] if layer == 3 else eye[3]) for layer in LAYERS]
    x = torch.cat([row.expand(8, 4) for row in rows])
    return sae, x, torch.repeat_interleave(torch.tensor(LAYERS), 8)


def test_a_latent_planted_at_one_layer_has_a_one_hot_profile():
    sae, x, ids = planted()
    mass = layer_mass(sae, x, ids, LAYERS)
    assert mass.dtype == torch.float64 and mass.shape == (4, 4)
    expected = torch.tensor([[24.0, 0, 0, 8], [0, 24, 0, 0], [0, 0, 24, 0], [8, 8, 8, 24]], dtype=torch.float64)
    torch.testing.assert_close(mass, expected)
    metrics, tables = spread(mass, LAYERS)
    profile = {(r["peak_layer"], r["layer"]): r for r in tables["layer_profile"]}
    assert [profile[2, layer]["mass"] for layer in LAYERS] == [0.0, 0.0, 1.0, 0.0]  # one-hot at layer 2
    assert profile[2, 2]["n_latents"] == 1
    # latent 0 peaks at 0: [0.75, 0, 0, 0.25]; latent 3 peaks at 3: [1/6, 1/6, 1/6, 1/2]
    assert [profile[0, layer]["mass"] for layer in LAYERS] == pytest.approx([0.75, 0, 0, 0.25])
    assert [profile[3, layer]["mass"] for layer in LAYERS] == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    spread_rows = {r["n_layers"]: r for r in tables["layer_spread"]}
    assert {n: r["n_latents"] for n, r in spread_rows.items()} == {1: 2, 2: 1, 3: 0, 4: 1}  # latent 2: one layer
    assert metrics == {"layers_active_mean": 2.0, "single_layer_frac": 0.5}


def test_histogram_counts_are_exact_on_a_hand_made_mass_matrix():
    mass = torch.tensor([
        [95.0, 5.0, 0.0],  # p = 0.05 at layer 1: on the threshold, active at 2 layers
        [96.0, 4.0, 0.0],  # 4% at layer 1: a stray, 1 layer
        [0.0, 0.0, 7.0],  # 1 layer
        [1.0, 1.0, 1.0],  # 3 layers
        [0.0, 0.0, 0.0],  # dead: not in any count
        [0.0, 2.0, 2.0],  # a tie peaks at the earlier layer: 2 layers
    ], dtype=torch.float64)
    metrics, tables = spread(mass, [4, 5, 6])
    assert [(r["n_layers"], r["n_latents"]) for r in tables["layer_spread"]] == [(1, 2), (2, 2), (3, 1)]
    assert [r["frac"] for r in tables["layer_spread"]] == [0.4, 0.4, 0.2]
    assert metrics["layers_active_mean"] == pytest.approx((2 + 1 + 1 + 3 + 2) / 5)
    assert metrics["single_layer_frac"] == pytest.approx(0.4)
    peaks = {(r["peak_layer"], r["layer"]): r for r in tables["layer_profile"]}
    assert peaks[4, 4]["n_latents"] == 3 and peaks[5, 5]["n_latents"] == 1 and peaks[6, 6]["n_latents"] == 1
    assert peaks[5, 5]["mass"] == 0.5 and peaks[5, 6]["mass"] == 0.5
    assert len(tables["layer_profile"]) == 9


def test_a_latent_spread_evenly_over_many_layers_is_active_at_all_of_them():
    metrics, tables = spread(torch.ones(3, 30, dtype=torch.float64), list(range(30)))  # p = 1/30 < 5%
    assert metrics == {"layers_active_mean": 30.0, "single_layer_frac": 0.0}
    assert tables["layer_spread"][-1] == {"n_layers": 30, "n_latents": 3, "frac": 1.0}


def test_no_live_latent_gives_nan_metrics():
    metrics, tables = spread(torch.zeros(4, 2, dtype=torch.float64), [0, 1])
    assert math.isnan(metrics["layers_active_mean"]) and math.isnan(metrics["single_layer_frac"])
    assert all(r["n_latents"] == 0 for r in tables["layer_spread"])


@pytest.mark.parametrize("cfg", [{"arch": "topk", "k": 3}, {"arch": "relu", "l1_coeff": 0.1}])
def test_mass_matches_a_dense_float64_reference(cfg):
    """Sparse (TopK) and dense (ReLU) codes, in batches that cut across the layers."""
    sae = SAE({**cfg, "d_in": 8, "n_latents": 32}, init_seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 50, 8, generator=g)
    ids = torch.repeat_interleave(torch.tensor([1, 4, 7]), 50)
    with torch.no_grad():
        code, _ = sae.encode_code(x)
        z = (code.dense(32) if hasattr(code, "dense") else code).double().abs()
    ref = torch.stack([z[ids == layer].sum(dim=0) for layer in (1, 4, 7)], dim=1)
    torch.testing.assert_close(layer_mass(sae, x, ids, [1, 4, 7], batch_size=37), ref, rtol=1e-6, atol=1e-9)


def test_adjacent_cosine_equals_a_dense_float64_reference():
    g = torch.Generator().manual_seed(2)
    n, layers = 300, [0, 2, 3]
    base = torch.randn(n, 16, generator=g)
    per = [base + s * torch.randn(n, 16, generator=g) for s in (0.1, 0.5, 2.0)]  # drifting residual streams
    x = torch.cat(per)
    ids = torch.repeat_interleave(torch.tensor(layers), n)
    rows = adjacent_cosine(x, ids, layers, batch_size=64)
    for row, a, b in zip(rows, per, per[1:]):
        a, b = a.double(), b.double()
        ref = float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())
        assert row["cosine"] == pytest.approx(ref, rel=1e-12, abs=1e-12)
        assert row["n_positions"] == n
    assert [(r["layer"], r["next_layer"]) for r in rows] == [(0, 2), (2, 3)]
    assert rows[0]["cosine"] > rows[1]["cosine"]
    with pytest.raises(ValueError, match="unequal"):
        adjacent_cosine(x[:-1], ids[:-1], layers)


def test_evaluate_run_returns_the_tables_only_for_multi_layer_saes():
    sae, x, ids = planted()
    cfg = EvalConfig(recovery=False, downstream=False)
    multi = evaluate_run(sae, x, cfg, LAYERS, None, layer_ids=ids)
    for table in ("layer_spread", "layer_profile", "adjacent_cosine"):
        assert table in RUN_TABLES and multi.tables[table]
    assert multi.metrics["layers_active_mean"] == 2.0 and multi.metrics["single_layer_frac"] == 0.5
    assert len(multi.tables["adjacent_cosine"]) == 3
    single = evaluate_run(sae, x[ids == 2], cfg, [2], None)
    assert not any(single.tables.get(t) for t in ("layer_spread", "layer_profile", "adjacent_cosine"))
    assert "layers_active_mean" not in single.metrics and "single_layer_frac" not in single.metrics


# ---------------------------------------------------------------- figures from a store


def store_with_runs(tmp_path, multi_layer: bool):
    from orchestrator.store import RUN_SCHEMA, ResultsStore

    store = ResultsStore(tmp_path, "xl")
    store.save_spec("name: xl\n")
    sae, x, ids = planted()
    for n in (16, 64):
        rid = f"mlsae_n{n}"
        ev = evaluate_run(sae, x, EvalConfig(recovery=False, downstream=False), LAYERS, None,
                          layer_ids=ids if multi_layer else None)
        row = {"run_id": rid, "sweep": "xl", "status": "ok", "arch": "topk", "n_latents": n, "k": 2, "seed": 0,
               "d_in": 4, "nmse": 0.1, "l0": 2.0, **ev.metrics}
        store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row, tables=ev.tables)
    return store


def test_cross_layer_figures_draw_one_line_per_multi_layer_run(tmp_path):
    import matplotlib.pyplot as plt

    from analysis import figures as F
    from analysis.results import load_runs

    store = store_with_runs(tmp_path, multi_layer=True)
    runs = load_runs(store.dir)
    assert set(runs["layers_active_mean"]) == {2.0} and set(runs["single_layer_frac"]) == {0.5}
    fig = F.fig_layer_spread(store.dir, runs)
    series = [line for line in fig.axes[0].get_lines() if line.get_gid() == "series"]
    assert len(series) == 2 and list(series[0].get_xdata()) == [1, 2, 3, 4]
    assert list(series[0].get_ydata()) == [0.5, 0.25, 0.0, 0.25]
    image = [im for im in fig.axes[1].get_images() if im.get_gid() == "profile"][0]
    assert image.get_array().shape == (4, 4) and float(image.get_array()[2, 2]) == 1.0  # latent 2: one-hot
    plt.close(fig)
    fig = F.fig_adjacent_cosine(store.dir, runs)
    lines = [line for line in fig.axes[0].get_lines() if line.get_gid() == "series"]
    assert len(lines) == 1  # the two runs read the same held-out set: one line
    assert list(lines[0].get_xdata()) == [0, 1, 2]
    assert lines[0].get_ydata()[0] == pytest.approx(1 / 10)  # (3 e0 + e3) . (3 e1 + e3) / 10
    plt.close(fig)
    result = F.render_all(store.dir, tmp_path / "figs", names=["layer_spread", "adjacent_cosine"])
    assert [(name, reason) for name, _, reason in result] == [("layer_spread", None), ("adjacent_cosine", None)]
    assert plt.get_fignums() == []


def test_cross_layer_figures_skip_a_sweep_without_multi_layer_runs(tmp_path):
    from analysis import figures as F
    from analysis.figures import SkipFigure
    from analysis.results import load_runs

    store = store_with_runs(tmp_path, multi_layer=False)
    runs = load_runs(store.dir)
    for fn in (F.fig_layer_spread, F.fig_adjacent_cosine):
        with pytest.raises(SkipFigure, match="no multi-layer SAE in the sweep"):
            fn(store.dir, runs)


def test_multi_layer_both_plans_per_layer_saes_at_equal_total_latents_on_the_same_vectors(tmp_path):
    import yaml

    from orchestrator.plan import plan_sweep

    spec = {"name": "both", "model": "embedded", "hook": {"site": "resid_post", "layers": [1, 2, 3],
                                                          "multi_layer": "both"},
            "data": {"text": {"embedded": True}, "train_tokens": 3000, "eval_tokens": 512},
            "grid": {"arch": ["topk"], "n_latents": [96, 192], "k": [4], "lr": [1e-3]},
            "overrides": {"topk": {"train_tokens": 9000}}}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = plan_sweep(path, tmp_path / "results").runs
    for n in (96, 192):
        multi = [r for r in runs if r.layer is None and r.n_latents == n]
        per = [r for r in runs if r.layer is not None and r.n_latents == n // 3]
        assert len(multi) == 1 and sorted(r.layer for r in per) == [1, 2, 3]
        assert multi[0].train["train_tokens"] == 9000 and {r.train["train_tokens"] for r in per} == {3000}
        assert sum(r.n_latents for r in per) == multi[0].n_latents
        assert {r.train["lr"] for r in per} == {1e-3}
    # the multi-layer run is the one `multi_layer: true` plans (same id: a sweep switched to both keeps it)
    spec["hook"]["multi_layer"] = True
    path.write_text(yaml.safe_dump(spec))
    alone = plan_sweep(path, tmp_path / "results").runs
    assert {r.run_id for r in alone} == {r.run_id for r in runs if r.layer is None}


def test_multi_vs_per_layer_pairs_each_multi_layer_sae_with_its_per_layer_saes(tmp_path):
    import matplotlib.pyplot as plt

    from analysis import figures as F
    from analysis.figures import SkipFigure
    from analysis.results import load_layers, load_runs
    from orchestrator.store import RUN_SCHEMA, ResultsStore

    store = ResultsStore(tmp_path, "both")
    store.save_spec("name: both\n")
    base = {"sweep": "both", "status": "ok", "arch": "topk", "k": 2, "seed": 0, "d_in": 4, "l0": 2.0, "lr": 1e-3}
    for n in (12, 48):
        per_layer = {layer: 0.1 * (layer + 1) * 12 / n for layer in (0, 1, 2)}
        rows = [{"layer": layer, "nmse": v / 2, "downstream_loss": v} for layer, v in per_layer.items()]
        multi = {**base, "run_id": f"multi{n}", "n_latents": n, "layer": None, "nmse": 0.2 * 12 / n}
        store.write_run({k: multi.get(k) for k in RUN_SCHEMA} | multi, tables={"layers": rows})
        for layer, v in per_layer.items():
            row = {**base, "run_id": f"per{n}_{layer}", "n_latents": n // 3, "layer": layer, "nmse": v / 4,
                   "downstream_loss": v / 3}
            store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row)
    runs, layers = load_runs(store.dir), load_layers(store.dir)
    fig = F.fig_multi_vs_per_layer(layers, runs)
    assert len(fig.axes) == 2  # nmse and downstream loss
    multi = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "multi_layer"]
    per = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "per_layer"]
    assert len(multi) == len(per) == 2
    assert list(multi[0].get_xdata()) == [0, 1, 2] and list(per[0].get_xdata()) == [0, 1, 2]
    assert list(per[0].get_ydata()) == pytest.approx([0.025, 0.05, 0.075])  # n=12: the per-layer runs' nmse
    assert list(multi[0].get_ydata()) == pytest.approx([0.05, 0.1, 0.15])  # the multi-layer run's layers table
    assert "n=4 each" in per[0].get_label() and "over 3 layers, n=12" in multi[0].get_label()
    plt.close(fig)
    only_multi = runs[runs["layer"].isna()]
    with pytest.raises(SkipFigure, match="multi_layer: both"):
        F.fig_multi_vs_per_layer(layers, only_multi)
