#!/usr/bin/env python
"""Every family on one synthetic ground-truth dataset: a small sweep of k (TopK family) and of the
sparsity coefficient (L1 family, JumpReLU), then each point's nmse against TopK's at the same L0.

Usage: .venv/bin/python bench/frontier_synthetic.py [--tokens 1000000]
The headline check of Gao et al. (2024, Fig. 2a): at matched L0, TopK's nmse is no worse than ReLU's.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from analysis.frontier import value_at_l0
from sae_core import Trainer
from sae_core.sources import SyntheticSource, mmcs

GRID = [("topk", "k", [2, 4, 8, 16, 32]), ("batchtopk", "k", [2, 4, 8, 16, 32]),
        ("multi_topk", "k", [2, 4, 8]),
        ("relu", "l1_coeff", [0.03, 0.1, 0.3, 1.0, 3.0]), ("gated", "l1_coeff", [0.03, 0.1, 0.3, 1.0, 3.0]),
        ("prolu", "l1_coeff", [0.03, 0.1, 0.3, 1.0, 3.0]),
        ("jumprelu", "target_l0", [2, 4, 8, 16, 32])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-in", type=int, default=32)
    ap.add_argument("--n-latents", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = SyntheticSource(d_in=args.d_in, n_features=4 * args.n_latents, active_per_vector=8,
                          frequency="power_law", frequency_exponent=0.5, noise_std=0.01, seed=0, n_eval=8192)
    rows = []
    t0 = time.time()
    for arch, key, values in GRID:
        for v in values:
            extra = {"sparsity": "target_l0"} if arch == "jumprelu" else {}
            cfg = {"arch": arch, "d_in": args.d_in, "n_latents": args.n_latents, "normalization": "none", key: v, **extra}
            r = Trainer(cfg, {"train_tokens": args.tokens, "batch_size": 1024, "lr": 2e-3,
                              "dead_window_tokens": args.tokens // 10}, src).run()
            rows.append({"arch": arch, key: v, "param": f"{key}={v}", "l0": r.metrics["l0"], "nmse": r.metrics["nmse"],
                         "dead": r.metrics["dead_frac"], "mmcs": mmcs(r.sae.net.W_dec, src.features), "status": r.status})
            print(f"  {arch:>10} {key}={v:<6} l0 {r.metrics['l0']:7.2f} nmse {r.metrics['nmse']:.4f}", flush=True)
    topk = [r for r in rows if r["arch"] == "topk"]
    tl0, tnmse = np.array([r["l0"] for r in topk]), np.array([r["nmse"] for r in topk])
    print(f"\n{len(rows)} runs of {args.tokens:,} vectors in {time.time() - t0:.0f} s; data: d_in {args.d_in}, "
          f"{4 * args.n_latents} true features (power law), ~8 active; SAEs n = {args.n_latents}\n")
    print(f"{'arch':>10} {'param':>16} {'l0':>7} {'nmse':>7} {'topk nmse @ l0':>15} {'ratio':>6} {'dead':>5} {'mmcs':>5}")
    for r in rows:
        ref = float(value_at_l0(tl0, tnmse, r["l0"]))
        ratio = r["nmse"] / ref if np.isfinite(ref) else float("nan")
        print(f"{r['arch']:>10} {r['param']:>16} {r['l0']:7.2f} {r['nmse']:7.4f} {ref:15.4f} {ratio:6.2f} "
              f"{r['dead']:5.2f} {r['mmcs']:5.2f}")
    print("\nratio = nmse / TopK's nmse at the same L0 (log-log interpolation; blank outside TopK's L0 range).")


if __name__ == "__main__":
    main()
