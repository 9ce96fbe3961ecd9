#!/usr/bin/env python
"""What a finished sweep's evaluation costs per run, on its own SAEs and held-out vectors: the progressive-
recovery grid (Gao et al. 2024, §5.3) in one pass over the vectors against one pass per point, and activation
refinement (§5.1) of eval.refinement_vectors vectors. Interleaved, best of --reps.

Usage: .venv/bin/python bench/evaluation.py [--sweep sweeps/quickstart.yaml] [--results results]
       [--reps 2] [--threads 2]          (after `make quickstart`, or any sweep that has finished)
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from timing import best_of  # bench/timing.py

from analysis import load_runs
from orchestrator.spec import load_spec
from sae_core.activation_data import ActivationData
from sae_core.evaluation import recovery
from sae_core.evaluation.reconstruction import evaluate
from sae_core.evaluation.refinement import refine
from sae_core.sae import SAE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="sweeps/quickstart.yaml")
    ap.add_argument("--results", default="results")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from machine import describe

    torch.set_num_threads(args.threads)
    print(describe() + "\n")
    spec = load_spec(args.sweep)
    sweep_dir = Path(args.results) / spec.name
    runs = load_runs(sweep_dir)
    runs = runs[runs.status == "ok"].sort_values(["arch", "n_latents", "k", "l1_coeff"])
    data = ActivationData(spec.model, spec.hook, spec.data).prepare()
    eval_sets = {}
    print(f"sweep {spec.name}: {len(runs)} runs, {spec.data.eval_tokens} held-out vectors\n")
    print("| run | arch | n | k / l1 | L0 | grid points | grid, point by point s | grid, one pass s | speed-up "
          "| refinement s |\n|---|---|---|---|---|---|---|---|---|---|")
    for run in runs.itertuples():
        layer = None if pd.isna(run.layer) else int(run.layer)
        if layer not in eval_sets:
            eval_sets[layer] = data.source(layer, seed=spec.data_seed).eval_set()
        x = eval_sets[layer]
        sae = SAE.load(sweep_dir / "saes" / run.run_id)
        ks = recovery.k_grid(sae, run.l0)
        grid = recovery.points(sae, ks, recovery.threshold_grid(sae, x, ks))
        keys = [k for k, _ in grid]
        apart = together = float("inf")
        for _ in range(2):  # interleaved
            apart = min(apart, best_of(lambda s=sae, v=x, g=grid: [evaluate(s, v, encode=e) for _, e in g], args.reps))
            together = min(together, best_of(partial(recovery.evaluate_points, sae, x, keys, 4096), args.reps))
        refined = best_of(partial(refine, sae, x[:spec.eval.refinement_vectors], spec.eval.refinement_max_active),
                          1)
        sparsity = run.k if run.arch in ("topk", "batchtopk", "multi_topk") else run.l1_coeff
        print(f"| {run.run_id[:8]} | {run.arch} | {run.n_latents} | {sparsity} | {run.l0:.0f} | {len(grid)} "
              f"| {apart:.2f} | {together:.2f} | {apart / together:.1f}x | {refined:.2f} |")


if __name__ == "__main__":
    main()
