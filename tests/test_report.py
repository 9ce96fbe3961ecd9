"""The report and figures as a reader meets them: every series a figure draws is named in its legend, no table is
empty, wide tables scroll inside their own box (the page stays as wide as the window)."""
from __future__ import annotations

import re

from test_sweep_fits import _write

import analysis.figures as F
from analysis.report import write_report
from analysis.results import load_curves, load_runs
from orchestrator.store import ResultsStore


def _one_width_per_series(tmp_path):
    """Two architectures at one width each: no law can be fitted, every L(C) curve stands alone."""
    store = ResultsStore(tmp_path, "lone")
    store.save_spec("name: lone\n")
    _write(store, "topk_run", 512, 3e-4, 0, 0.2)
    _write(store, "relu_run", 512, 3e-4, 0, 0.3)
    relu = store.rows_of(["relu_run"])["relu_run"]
    curve = load_curves(store.dir).query("run_id == 'relu_run'").drop(columns="run_id").to_dict("records")
    store.write_run({**relu, "arch": "relu", "k": None, "l1_coeff": 5e-3}, curve=curve)
    return store


def test_each_curve_of_the_compute_figure_is_named_without_a_frontier(tmp_path):
    store = _one_width_per_series(tmp_path)
    fig = F.fig_loc(load_curves(store.dir), load_runs(store.dir))
    labels = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else \
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("topk" in label for label in labels) and any("relu" in label for label in labels), labels


def test_a_report_without_fits_has_no_empty_table_and_scrolls_wide_tables(tmp_path):
    store = _one_width_per_series(tmp_path)
    html = write_report(store.dir).read_text()
    for table in re.findall(r"<table.*?</table>", html, re.S):
        assert "<td" in table, "a table without rows"
    assert "No law could be fitted" in html
    assert html.count("<table") == html.count("<div class='scroll'><table")
    assert "overflow-x:auto" in html
