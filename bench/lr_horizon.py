#!/usr/bin/env python
"""The best constant learning rate against the training budget: ours (TopK, Adam), synthetic or real vectors.

Gao et al. 2024 read the lr rule that `lr: auto` follows, 2e-4 / sqrt(n / 2^14), off runs trained to
convergence (their Fig. 3: 0.6-7.9B tokens at batch 131072). Bjorck et al. 2024 ("Scaling Optimal LR Across
Token Horizons", ICLR 2025) find that the best lr falls with the training horizon D as a power law,
lr*(D) = B D^-beta. This measures that dependence for an SAE: ours trains at multiples of the paper's lr, each
for the longest budget, through bench/quality_defaults.py's worker (its data: bench/peers.py's synthetic
vectors, or --data minilm, the embedded MiniLM-L6's residual stream; held-out FVU about 4 times a decade).
At a constant lr nothing in ours' TopK recipe depends on the budget, so a run's FVU after s steps is that of
an s-step run and each curve gives every shorter budget. Prints, per budget, the FVU at each multiple, the
best multiple and the optimum interpolated between multiples, then the power law fitted to the optima from
--fit-from steps on (what sae_core.config's `lr: horizon` constants come from); writes the JSON and a figure.

Usage: .venv/bin/python bench/lr_horizon.py [--config 384x6144] [--steps 2000] [--multiples 1,2,4,8,16,32]
       [--threads 2] [--data synthetic|minilm] [--fit-from 100] [--plot-only]
About 6 min per multiple at 384x6144 and 2000 steps on 2 threads of an AVX512-BF16 Xeon.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
import quality_defaults as qd  # noqa: E402


def optimum(fvu: dict[float, float]) -> float | None:
    """The best multiple between the grid's: the vertex of the parabola through log FVU against log lr at the
    best multiple and its two neighbours; None when the best is at the grid's edge (the optimum lies beyond)."""
    ms = sorted(fvu)
    i = min(range(len(ms)), key=lambda j: fvu[ms[j]])
    if i in (0, len(ms) - 1):
        return None
    (x0, x1, x2), (y0, y1, y2) = ([math.log(m) for m in ms[i - 1:i + 2]],
                                  [math.log(fvu[m]) for m in ms[i - 1:i + 2]])
    # vertex of the parabola through three points (x1 lies between x0 and x2 and y1 is the least)
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return math.exp(x1 - 0.5 * num / den)


def best_by_budget(runs: list[dict]) -> list[dict]:
    """Per eval point every run reached: each multiple's FVU, the best multiple and the interpolated optimum."""
    points = sorted({p["vectors"] for r in runs for p in r["curve"]})
    rows = []
    for v in points:
        fvu = {r["multiple"]: p["fvu"] for r in runs for p in r["curve"] if p["vectors"] == v}
        if len(fvu) == len(runs):
            best = min(fvu, key=fvu.get)
            rows.append({"steps": v // qd.BATCH, "fvu": fvu, "best": best, "optimum": optimum(fvu)})
    return rows


def horizon_law(rows: list[dict], min_steps: int) -> tuple[float, float] | None:
    """(beta, D1): the least-squares line log m* = -beta log(D / D1) through the interpolated optima m* at the
    budgets D (vectors) of at least min_steps steps (Bjorck et al.'s lr*(D) = B D^-beta, with the paper's rule
    as m* = 1, reached at D1); None with fewer than 3 such budgets."""
    pts = [(math.log(r["steps"] * qd.BATCH), math.log(r["optimum"])) for r in rows
           if r["optimum"] and r["steps"] >= min_steps]
    if len(pts) < 3:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return -slope, math.exp(mx - my / slope)


def report(saved: dict, figure_path: Path, min_steps: int) -> None:
    runs, multiples = saved["runs"], sorted(r["multiple"] for r in saved["runs"])
    rows = best_by_budget(runs)
    print(f"vectors: {qd.DATA[saved.get('data', 'synthetic')]}")
    print(f"{saved['config']}, k {qd.K}, batch {qd.BATCH}; lr = multiple x {peers.adam_lr(saved['n']):.3g} "
          f"(the paper's rule)\n")
    print("| steps | vectors | " + " | ".join(f"x{m:g}" for m in multiples) + " | best | optimum |")
    print("|" + "---|" * (4 + len(multiples)))
    for r in rows:
        cells = [f"**{r['fvu'][m]:.4f}**" if m == r["best"] else f"{r['fvu'][m]:.4f}" for m in multiples]
        opt = f"x{r['optimum']:.1f}" if r["optimum"] else "edge"
        print(f"| {r['steps']} | {r['steps'] * qd.BATCH:,} | " + " | ".join(cells) + f" | x{r['best']:g} | {opt} |")
    law = horizon_law(rows, min_steps)
    if law:
        print(f"\nfrom {min_steps} steps on: best lr = paper's rule x (vectors / D1)^-beta, beta {law[0]:.3f}, "
              f"D1 {law[1]:.3g} vectors")
    import matplotlib.pyplot as plt

    from analysis.figures.style import STYLE
    from sae_core.io import write_atomic

    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 3.6))
        for i, r in enumerate(sorted(runs, key=lambda r: r["multiple"])):
            left.plot([p["vectors"] // qd.BATCH for p in r["curve"]], [p["fvu"] for p in r["curve"]],
                      color=f"C{i}", marker="o", markersize=3, label=f"lr x{r['multiple']:g}")
        left.set(xscale="log", yscale="log", xlabel="steps (batch 4096)", ylabel="held-out FVU",
                 title=f"{saved['config']}, {saved.get('data', 'synthetic')}: constant lr, multiples of the paper's")
        left.legend(fontsize=7)
        steps = [r["steps"] for r in rows]
        right.plot(steps, [r["best"] for r in rows], "o", color="C0", label="best of the grid")
        inner = [r for r in rows if r["optimum"]]
        right.plot([r["steps"] for r in inner], [r["optimum"] for r in inner], "s", color="C1", markersize=4,
                   label="interpolated optimum")
        if law:
            fit = [s for s in steps if s >= min_steps]
            right.plot(fit, [(s * qd.BATCH / law[1]) ** -law[0] for s in fit], "-", color="C1",
                       label=f"fit: optimum ∝ D^{-law[0]:+.2f}")
            if law[0] > 0:  # falling with the horizon: where it meets the paper's rule
                right.plot([fit[-1], law[1] / qd.BATCH], [(fit[-1] * qd.BATCH / law[1]) ** -law[0], 1.0], ":",
                           color="C1", label="extrapolated to the rule")
        right.axhline(1, color="grey", lw=0.8)
        right.legend(fontsize=7)
        right.set(xscale="log", yscale="log", xlabel="budget (steps)", ylabel="best lr / paper's rule",
                  title="best constant lr against the budget")
        write_atomic(figure_path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="384x6144", choices=list(qd.CONFIGS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--multiples", default="1,2,4,8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=list(qd.DATA), default="synthetic")
    ap.add_argument("--out-json", type=Path, help="default bench/results/lr_horizon[_DATA].json")
    ap.add_argument("--figure", type=Path, help="default docs/figures/lr_horizon[_DATA].png")
    ap.add_argument("--fit-from", type=int, default=100, help="fit the horizon law to budgets of this many steps on")
    ap.add_argument("--plot-only", action="store_true", help="table and figure from --out-json, no training")
    args = ap.parse_args()
    qd.outputs(args, "lr_horizon", "lr_horizon")
    import machine  # bench/machine.py

    sys.path.insert(0, str(peers.ROOT))
    from sae_core.io import write_atomic
    from sae_core.trainer import curve_steps

    if args.plot_only:
        report(json.loads(args.out_json.read_text()), args.figure, args.fit_from)
        return
    d, n, _ = qd.CONFIGS[args.config]
    saved = {"machine": machine.describe(), "config": args.config, "n": n, "data": args.data, "runs": []}
    data = qd.data_file(args.data, d, args.steps * qd.BATCH)
    print(saved["machine"] + "\n", flush=True)
    args.budget_s = 4 * 3600.0  # qd.run_one's hang guard; these runs are meant to finish
    for m in map(float, args.multiples.split(",")):
        spec = dict(config=args.config, trainer="ours", d=d, n=n, steps=args.steps,
                    eval_at=curve_steps(args.steps, qd.BATCH, qd.PER_DECADE), threads=args.threads,
                    budget_s=args.budget_s, ours_train={"lr": m * peers.adam_lr(n)}, data=data)
        run = qd.run_one(Path(sys.executable), spec, args)
        print(f"lr x{m:g}: {run['steps']} steps, {run['train_s']:.0f} s {run['note']}", flush=True)
        saved["runs"].append({**run, "multiple": m})
        write_atomic(args.out_json, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    print()
    report(saved, args.figure, args.fit_from)


if __name__ == "__main__":
    main()
