"""Sparsity-reconstruction frontiers: comparing SAE families at matched L0."""
from __future__ import annotations

import numpy as np


def value_at_l0(l0: np.ndarray, value: np.ndarray, at: float | np.ndarray) -> np.ndarray:
    """A family's metric (e.g. nmse) at the given L0, by linear interpolation in log L0 / log value
    between its measured points (the frontiers are straight-ish on log-log axes). NaN outside the
    measured L0 range: a frontier is never extrapolated."""
    l0, value = np.asarray(l0, float), np.asarray(value, float)
    order = np.argsort(l0)
    l0, value = l0[order], value[order]
    at = np.asarray(at, float)
    inside = (at >= l0[0]) & (at <= l0[-1])
    out = np.exp(np.interp(np.log(np.clip(at, l0[0], l0[-1])), np.log(l0), np.log(value)))
    return np.where(inside, out, np.nan)


def lower_envelope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope, in increasing x: the points whose y is strictly below every y at
    smaller or equal x. The compute frontier of training curves (L(C)) and the Pareto frontier of nmse
    against L0 are both this. Ties (same x and y) keep the first in input order (lexsort is stable)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.lexsort((y, x))
    ys = y[order]
    return order[ys < np.minimum.accumulate(np.r_[np.inf, ys[:-1]])]
