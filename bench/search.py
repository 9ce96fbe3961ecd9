#!/usr/bin/env python
"""Successive-halving lr search (orchestrator/search.py) against the full grid, side by side in one run, on
synthetic activations: 3 widths x 5 learning rates (sweep A, k 8) and the same with 2 k (sweep B, k 4 and 16).
Each sweep runs three ways into its own results folder: the full grid, the search with its guard (the
defaults: half kept per rung, a late rung at 2/3 of the budget deciding the last two, ranked by the nmse
extrapolated along each run's recent slope) and textbook successive halving (eta 3, rank by the nmse at the
rung, min_keep 1).

Per cell (width x k): the lr each picks, the ratio of its final nmse to the grid's best, and over the sweep
the training FLOPs spent against the grid's; then the lr*(n) law the search fits (each candidate at its
estimated budget nmse, analysis.sweep_fits.search_estimates) against the grid's: whether its exponent lies
inside the grid's 95% interval, and the ratio of the two laws' lr* at each width.

Usage: .venv/bin/python bench/search.py [--tokens 300000]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import yaml

from analysis.results import load_runs
from analysis.sweep_fits import fit_sweep
from orchestrator.scheduler import run_sweep

LRS = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
WIDTHS = [128, 256, 512]
MODES = {"grid": None, "search": {}, "no guard": {"eta": 3, "rank": "current", "min_keep": 1}}


def sweep(name: str, ks: list[int], tokens: int, search: dict | None) -> dict:
    spec = {"name": name,
            "data": {"synthetic": {"d_in": 64, "n_features": 2048, "active_per_vector": 8, "frequency": "power_law",
                                   "frequency_exponent": 0.5, "noise_std": 0.01},
                     "train_tokens": tokens, "eval_tokens": 4096},
            "grid": {"arch": ["topk"], "n_latents": WIDTHS, "k": ks, "lr": LRS},
            "sae": {"normalization": "none"},
            "train": {"batch_size": 512, "curve_points_per_decade": 8, "init_samples": 2048},
            "eval": {"recovery": False, "refinement": False}, "pack_size": 5, "resources": {"cpus": 2}}
    return spec if search is None else {**spec, "search": search}


def run(folder: Path, spec: dict) -> tuple[float, object]:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        run_sweep(path, folder, echo=lambda s: None)
    return time.time() - t0, load_runs(folder / spec["name"])


def lr_law(folder: Path):
    fits, _ = fit_sweep(folder, laws=("lr",))
    return {f.group.get("k"): f for f in fits.values()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=300_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    for label, ks in (("A", [8]), ("B", [4, 16])):
        out = {}
        for mode, search in MODES.items():
            folder = root / mode.replace(" ", "-")
            folder.mkdir(exist_ok=True)
            out[mode] = run(folder, sweep(label, ks, args.tokens, search)) + (folder / label,)
        grid = out["grid"][1]
        grid_flops = grid["flops"].sum()
        print(f"\nsweep {label}: {len(WIDTHS)} widths x {len(ks)} k x {len(LRS)} lrs, {args.tokens:,} vectors per run")
        print(f"{'mode':>9} {'n':>5} {'k':>3} {'picked lr':>10} {'grid best lr':>12} {'nmse / grid best':>17}")
        for mode in ("search", "no guard"):
            runs = out[mode][1]
            for (n, k), cell in grid.groupby(["n_latents", "k"]):
                best = cell.loc[cell["nmse"].idxmin()]
                won = runs[(runs.n_latents == n) & (runs.k == k) & (runs.status == "ok")]
                won = won.loc[won["nmse"].idxmin()]
                print(f"{mode:>9} {n:>5} {k:>3} {won.lr:>10.2g} {best.lr:>12.2g} {won.nmse / best.nmse:>17.4f}")
        for mode, (seconds, runs, _) in out.items():
            print(f"{mode:>9}: training FLOPs {runs['flops'].sum() / grid_flops:6.1%} of the grid's, "
                  f"wall {seconds:5.0f} s, {int((runs.status == 'stopped').sum())} runs stopped early")
        grid_law = lr_law(out["grid"][2])
        for mode in ("search", "no guard"):
            try:
                law = lr_law(out[mode][2])
            except Exception as err:  # noqa: BLE001  (a benchmark reports, it does not stop)
                print(f"{mode:>9}: no lr law ({err})")
                continue
            for k, fit in law.items():
                ref = grid_law.get(k)
                if ref is None:
                    continue
                lo, hi = ref.ci["b"]
                ratios = " ".join(f"{fit.predict(n_latents=n) / ref.predict(n_latents=n):.2f}" for n in WIDTHS)
                print(f"{mode:>9} lr*(n), k {k}: {fit.formula} vs the grid's {ref.formula}: exponent "
                      f"{fit.params['b']:.3f} {'inside' if lo <= fit.params['b'] <= hi else 'OUTSIDE'} the grid's "
                      f"95% interval [{lo:.3f}, {hi:.3f}]; lr* / grid's lr* at n = {WIDTHS}: {ratios}")
    print(f"\nresults under {root}")


if __name__ == "__main__":
    main()
