"""Extrapolation from the fitted laws: what a sweep's laws (analysis.sweep_fits, the same fits.json `fit`, the
figures and the report use) predict at a size or compute the sweep did not train, each with the 95% interval
of its bootstrap draws, and how far beyond the fitted range it reaches.

    sae-scaling predict results/gpt2-l8 --n-latents 16777216 --k 32     # L(N), L(n, k), lr*(n)
    sae-scaling predict results/gpt2-l8 --flops 1e18                      # L(C)

A law answers when it has all it needs: L(N) and lr*(n) the width (and, for a series of one k, that k when
--k is given), L(n, k) the width and k, L(C) the compute. lr*(n) gives the best learning rate at that width:
Gao et al. 2024 (§3.1) tune lr at each size, so a new size's run needs the law's lr, not a grid's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.fits import Fit
from analysis.results import Sweeps
from analysis.sweep_fits import sweep_fits
from sae_core.errors import DataError

QUANTITY = {"lofn": "nmse", "joint": "nmse", "loc": "nmse", "lr": "best lr"}


@dataclass
class Prediction:
    law: str  # the fit's name, e.g. "L(N) arch=topk, k=32"
    quantity: str  # nmse or best lr
    at: dict  # the law's inputs
    value: float
    low: float
    high: float
    beyond: float  # the largest factor by which an input exceeds the fitted range (1: inside it)


def _inputs(fit: Fit, n_latents: int | None, k: int | None, flops: float | None) -> dict | None:
    given = {"n_latents": n_latents, "k": k, "flops": flops}
    if any(given[v] is None for v in fit.variables):
        return None
    if k is not None and "k" not in fit.variables and fit.group.get("k") not in (None, k):
        return None  # a series of another k
    return {v: float(given[v]) for v in fit.variables}


def _beyond(fit: Fit, at: dict) -> float:
    factor = 1.0
    for v, x in at.items():
        lo, hi = fit.x_range.get(v, (x, x))
        factor = max(factor, x / hi if x > hi else (lo / x if 0 < x < lo else 1.0))
    return factor


def predict(sweep_dir: Sweeps, n_latents: int | None = None, k: int | None = None, flops: float | None = None,
            all_runs: bool = False) -> list[Prediction]:
    """Every fitted law's prediction at the given inputs; DataError when none applies."""
    if n_latents is None and flops is None:
        raise DataError("predict: give --n-latents (L(N), L(n, k), lr*(n)) or --flops (L(C)), or both")
    fits, skipped = sweep_fits(sweep_dir, all_runs)
    out = []
    for name, fit in fits.items():
        at = _inputs(fit, n_latents, k, flops)
        if at is None:
            continue
        value = fit.predict(**at)
        low, high = fit.predict_interval(**at)
        out.append(Prediction(name, QUANTITY.get(fit.law, fit.law), at, value, low, high, _beyond(fit, at)))
    if not out:
        have = ", ".join(fits) or "none"
        raise DataError(f"predict: no fitted law takes these inputs; the sweep's laws: {have}"
                        + (f" ({len(skipped)} skipped: `sae-scaling fit` says why)" if skipped else ""))
    return out


def format_predictions(preds: list[Prediction]) -> str:
    width = max(len(p.law) for p in preds)
    lines = []
    for p in preds:
        at = ", ".join(f"{v}={x:.4g}" for v, x in p.at.items())
        interval = ("" if math.isnan(p.low) else f"  95% interval [{p.low:.4g}, {p.high:.4g}]")
        far = f"  (extrapolated {p.beyond:.3g}x beyond the fitted range)" if p.beyond > 1 else ""
        lines.append(f"{p.law:{width}}  at {at}: {p.quantity} {p.value:.4g}{interval}{far}")
    return "\n".join(lines)
