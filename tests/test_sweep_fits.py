"""One selection and one fit serve `sae-scaling fit`, the figures and the report (analysis/sweep_fits.py): the
fits take each width at its best lr, fits.json is what the figures draw, and it is refitted only when stale."""
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis.report import write_report  # noqa: E402
from analysis.results import load_runs  # noqa: E402
from analysis.sweep_fits import fit_sweep, read_fits, sweep_fits, write_fits  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.store import RUN_SCHEMA, ResultsStore  # noqa: E402

NS = [256, 512, 1024, 2048, 4096]
LRS = [1e-4, 3e-4, 1e-3]
C, A, B = 0.05, 3.0, -0.3


def _write(store, rid, n, lr, seed, nmse, tokens=10**6):
    ts = np.geomspace(1e3, tokens, 12)
    curve = [{"step": i, "tokens": int(t), "flops": float(t * 6 * 16 * n), "nmse": nmse * (1 + (t / 1e3) ** -1.0),
              "l0": 8.0, "dead_frac": 0.0, "lr": lr} for i, t in enumerate(ts)]
    row = {"run_id": rid, "sweep": "lrs", "status": "ok", "arch": "topk", "n_latents": n, "k": 8, "lr": lr,
           "seed": seed, "layer": 0, "d_in": 16, "tokens": tokens, "flops": float(tokens * 6 * 16 * n), "nmse": nmse,
           "l0": 8.0, "dead_frac": 0.0, "config_json": json.dumps({"axes": {"n_latents": n, "lr": lr, "seed": seed}})}
    store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row, curve=curve)


@pytest.fixture
def sweep(tmp_path):
    """5 widths x 3 lrs x 2 seeds: 3e-4 reaches the law, the other lrs are worse the wider the SAE."""
    store = ResultsStore(tmp_path, "lrs")
    store.save_spec("name: lrs\n")
    rng = np.random.default_rng(0)
    for n in NS:
        for lr in LRS:
            for seed in (0, 1):
                penalty = 1.0 if lr == 3e-4 else 1.0 + 0.1 * np.log2(n / 128)
                nmse = (C + A * n ** B) * penalty * np.exp(0.005 * rng.standard_normal())
                _write(store, f"n{n}_lr{lr:g}_s{seed}", n, lr, seed, nmse)
    return store


def test_fits_use_each_width_at_its_best_lr_and_say_which_runs(sweep, capsys):
    fits, skipped = fit_sweep(sweep.dir)
    lofn = fits["L(N) arch=topk, k=8"]
    assert sorted(lofn.runs) == sorted(f"n{n}_lr0.0003_s{s}" for n in NS for s in (0, 1))
    assert lofn.group == {"arch": "topk", "k": 8}
    assert lofn.ci["b"][0] <= B <= lofn.ci["b"][1]
    # L(C) is the envelope of every run's curve, so it names runs of any lr; lr*(n) sees every lr
    assert set(fits["L(C) arch=topk, k=8"].runs) <= set(load_runs(sweep.dir).run_id)
    assert len(fits["lr*(n) arch=topk, k=8"].runs) == len(NS) * len(LRS) * 2
    assert main(["fit", str(sweep.dir)]) == 0
    assert "10 points from 10 runs" in capsys.readouterr().out


def test_figures_draw_the_fits_fit_wrote_and_refit_only_when_stale(sweep, tmp_path):
    fits, skipped = fit_sweep(sweep.dir)
    write_fits(sweep.dir, fits, skipped)
    path = sweep.dir / "fits" / "fits.json"
    data = json.loads(path.read_text())
    data["fits"]["L(N) arch=topk, k=8"]["formula"] = "L = the formula in fits.json"
    path.write_text(json.dumps(data))
    assert read_fits(sweep.dir)[0]["L(N) arch=topk, k=8"].formula == "L = the formula in fits.json"
    F.render_all(sweep.dir, tmp_path / "figs", names=["lofn"])
    fig = F.fig_lofn(load_runs(sweep.dir), read_fits(sweep.dir))
    labels = [line.get_label() for line in fig.axes[0].lines if line.get_gid() == "fit"]
    assert any("the formula in fits.json" in label for label in labels)
    # the plotted points are the fit's runs: every width at its best lr, both seeds
    pts = [line for line in fig.axes[0].lines if line.get_gid() == "points"]
    assert sum(len(p.get_xdata()) for p in pts) == 10
    # a changed run makes fits.json stale: the figures refit and rewrite it
    _write(sweep, "n4096_lr0.0003_s0", 4096, 3e-4, 0, 0.2)
    assert read_fits(sweep.dir) is None
    fits, _ = sweep_fits(sweep.dir)
    assert fits["L(N) arch=topk, k=8"].formula != "L = the formula in fits.json"
    assert read_fits(sweep.dir) is not None


def test_report_reads_current_fits_and_a_partial_fit_is_not_current(sweep):
    assert main(["fit", str(sweep.dir), "--law", "lofn"]) == 0
    assert read_fits(sweep.dir) is None  # only one law: the figures fit the rest
    write_report(sweep.dir)
    full = read_fits(sweep.dir)
    assert full is not None and {f.law for f in full[0].values()} == {"lofn", "loc", "lr"}
    html = (sweep.dir / "figures" / "report.html").read_text()
    assert full[0]["L(N) arch=topk, k=8"].formula in html
