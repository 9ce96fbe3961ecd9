"""Which runs reach a law or a figure. One selection, stated once, used by `sae-scaling fit`, every figure and
the report, so a legend's law and the points under it come from the same runs.

- usable: status ok and a finite, positive metric (`usable`);
- cell: every setting of a run but its learning rate and seed: the family (arch, and ProLU's gradient), the
  width, the sparsity setting (the family's `Architecture.sparsity_keys`: k, l1_coeff, ...), the site (model,
  hook, layer) and any other key the sweep varied (`cell_keys`);
- best lr: in each cell, the learning rate with the lowest final nmse averaged over seeds; all its seeds are
  kept (`best_lr`). Gao et al. 2024 (§3.1, Fig. 3) fit L(N) to the loss of each size at its best learning
  rate, from an lr sweep per size; pooling every lr would put a sweep's worst lrs into the exponent;
- series: the cells of one family, sparsity value and site that differ in width (`series`): one L(N), one
  lr*(n) and one L(C) each; the joint L(n, k) takes a family's series of every k at one site, for the families
  whose L0 is set by k (`l0_set_by_k`).
What a family's sparsity is and whether its L0 is set by k, its class says (sae_core.architectures): a new
architecture reaches the fits and figures through its own file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

# importing sae_core.architectures (this submodule's package) registers every family
from sae_core.architectures.base import Architecture, registry

# every registered family's sparsity keys, each family's in its own priority order
SPARSITY_KEYS = tuple(dict.fromkeys(key for name in sorted(registry()) for key in registry()[name].sparsity_keys))
SITE_KEYS = ("model", "hook", "layer")
NOT_CELL = ("lr", "seed")
_KNOWN = ("family", "n_latents", *SPARSITY_KEYS, *SITE_KEYS)
# swept keys that are not settings of the SAE's result (or already named by another column)
_NOT_SETTINGS = {"arch", "expansion_factor", "n_latents", *NOT_CELL}


def numeric(d: pd.DataFrame, c: str) -> pd.Series:
    """A column as float (NaN where missing or null; NaN everywhere if the column is absent)."""
    if c not in d:
        return pd.Series(np.nan, index=d.index, dtype=float)
    return pd.to_numeric(d[c], errors="coerce").astype(float)


def architecture(family: str) -> type[Architecture] | None:
    """The registered class of a family (`families`: "prolu-ste" is ProLU's); None for an unknown one."""
    return registry().get(str(family).split("-")[0])


def l0_set_by_k(family: str) -> bool:
    """Whether the family's L0 is set by k (`Architecture.l0_set_by_k`), so that the joint L(n, k) applies."""
    cls = architecture(family)
    return cls is not None and cls.l0_set_by_k


def family_sparsity_keys(family: str) -> tuple[str, ...]:
    """The family's sparsity keys in priority order; every family's for one not registered (a sweep of an older
    version, or tables built by hand), which then takes the first of them its runs set."""
    cls = architecture(family)
    return SPARSITY_KEYS if cls is None else cls.sparsity_keys


def families(d: pd.DataFrame) -> pd.Series:
    """The architecture, with ProLU's two gradients as two families (Gao et al. 2024, Fig. 2: ProLU-STE and
    ProLU-ReLU are compared as separate methods)."""
    fam = d["arch"].astype(str) if "arch" in d else pd.Series("sae", index=d.index)
    if "gradient" in d:
        g = d["gradient"]
        prolu = fam.eq("prolu") & g.notna()
        fam = fam.where(~prolu, "prolu-" + g.astype(str))
    return fam


def usable(runs: pd.DataFrame, y: str = "nmse", positive: bool = True,
           statuses: tuple[str, ...] = ("ok",)) -> tuple[pd.DataFrame, dict[str, str]]:
    """Runs with status ok (or one of `statuses`) and a finite (positive) y, with a `family` column; and
    {run_id: reason} for every row left out, so nothing disappears silently."""
    excluded: dict[str, str] = {}
    ids = run_ids(runs)
    d = runs
    if "status" in d:
        bad = ~d["status"].astype(str).isin(statuses)
        excluded.update({r: f"status {s}" for r, s in zip(ids[bad], d["status"][bad])})
        d = d[~bad]
    v = numeric(d, y).to_numpy()
    bad = ~(np.isfinite(v) & ((v > 0) if positive else True))
    excluded.update({r: f"{y} missing or not positive" for r in run_ids(d)[bad]})
    d = d[~bad].copy()
    d["family"] = families(d)
    return d, excluded


def run_ids(d: pd.DataFrame) -> pd.Series:
    return d["run_id"].astype(str) if "run_id" in d else pd.Series(d.index.astype(str), index=d.index)


def swept_keys(d: pd.DataFrame) -> list[str]:
    """The keys the sweep varied (config_json's `axes`), beyond the ones every cell already names."""
    if "config_json" not in d:
        return []
    keys: set[str] = set()
    for text in d["config_json"].dropna():
        try:
            keys |= set(json.loads(text).get("axes", {}))
        except (ValueError, AttributeError):
            continue
    return sorted(k for k in keys - _NOT_SETTINGS - set(_KNOWN) if k in d)


def cell_keys(d: pd.DataFrame) -> list[str]:
    return [c for c in (*_KNOWN, *swept_keys(d)) if c in d]


def cell_labels(d: pd.DataFrame) -> pd.Series:
    """One label per row for its cell and seed: the runs that differ only in their learning rate."""
    return _labels(d, cell_keys(d) + (["seed"] if "seed" in d else []))


def _labels(d: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One hashable label per row for the values of `keys` (nulls equal to each other)."""
    vals = d[keys].astype(object).where(d[keys].notna(), None).to_numpy()
    return pd.Series([repr(tuple(r)) for r in vals], index=d.index)


def best_lr(d: pd.DataFrame, y: str = "nmse") -> tuple[pd.DataFrame, dict[str, str]]:
    """Each cell at its best learning rate: the lr whose mean y over seeds is lowest (ties: the smaller lr).
    Returns the kept rows (every seed of that lr) and {run_id: reason} for the runs of the other lrs."""
    if "lr" not in d or d["lr"].nunique(dropna=True) <= 1:
        return d, {}
    cell = _labels(d, cell_keys(d))
    lr = numeric(d, "lr").fillna(-1.0)
    means = numeric(d, y).groupby([cell, lr]).mean()
    best = means.groupby(level=0).idxmin()  # cell -> (cell, lr)
    best_of = {c: v for c, v in best.to_list()}
    keep = np.array([best_of[c] == v for c, v in zip(cell, lr)])
    dropped = {r: f"lr {v:g} is not its cell's best lr ({best_of[c]:g}, by mean {y} over seeds)"
               for r, c, v in zip(run_ids(d)[~keep], cell[~keep], lr[~keep])}
    return d[keep], dropped


def sparsity_key(part: pd.DataFrame) -> str | None:
    """The first sparsity key of `part`'s family (rows of one family) that its runs set, or None."""
    fams = part["family"].unique() if "family" in part else [""]
    for key in dict.fromkeys(k for f in fams for k in family_sparsity_keys(f)):
        if key in part and part[key].notna().any():
            return key
    return None


@dataclass
class Series:
    """The runs of one family, sparsity value and site. `group` names them ({"arch": "topk", "k": 32,
    "layer": 8}: the family under "arch", site keys only where the runs hold several sites)."""
    group: dict
    rows: pd.DataFrame

    @property
    def family(self) -> str:
        return self.group["arch"]

    @property
    def key(self) -> str | None:
        return next((k for k in self.group if k in SPARSITY_KEYS), None)

    @property
    def value(self):
        return self.group.get(self.key) if self.key else None


def plain_value(v):
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    v = v.item() if isinstance(v, np.generic) else v
    return int(v) if isinstance(v, float) and v.is_integer() else v


def varying_sites(d: pd.DataFrame) -> list[str]:
    return [c for c in SITE_KEYS if c in d and d[c].astype(object).where(d[c].notna(), None).nunique(dropna=False) > 1]


def series(d: pd.DataFrame, by_sparsity: bool = True) -> list[Series]:
    """`d` (with a family column) split into series, in a stable order: per family, per value of its sparsity
    key (when `by_sparsity`), per site where the runs hold several."""
    sites = varying_sites(d)
    out = []
    for fam, part in d.groupby("family", sort=True):
        key = sparsity_key(part) if by_sparsity else None
        keys = ([key] if key else []) + sites
        if not keys:
            out.append(Series({"arch": fam}, part))
            continue
        for _, rows in part.groupby(_labels(part, keys), sort=False):
            first = rows.iloc[0]
            out.append(Series({"arch": fam, **{k: plain_value(first[k]) for k in keys}}, rows))
    return sorted(out, key=lambda s: (s.family, *[(v is None, v if isinstance(v, (int, float)) else str(v))
                                                  for v in list(s.group.values())[1:]]))


def group_label(group: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.items() if v is not None)


def width_ladders(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """Width ladders, the "SAE families" of Leask et al. 2025: SAEs that differ only in width. Usable runs, each
    cell at its best lr; then one ladder per (everything but the width) and seed, with one run per width,
    widest last. Only ladders of at least 2 widths."""
    d, _ = usable(runs)
    d, _ = best_lr(d)
    keys = [k for k in cell_keys(d) if k != "n_latents"] + (["seed"] if "seed" in d else [])
    out = []
    for _, rows in d.groupby(_labels(d, keys), sort=True):
        rows = rows.sort_values(["n_latents", *(["run_id"] if "run_id" in rows else [])])
        if rows["n_latents"].nunique() >= 2:
            first = rows.iloc[0]
            group = {("arch" if k == "family" else k): plain_value(first[k]) for k in keys}
            out.append(({k: v for k, v in group.items() if v is not None}, rows.drop_duplicates("n_latents")))
    return out
