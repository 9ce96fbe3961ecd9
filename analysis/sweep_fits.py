"""The laws a sweep's data support, fitted once and written to `results/<sweep>/fits/` (fits.json,
fits.parquet); `sae-scaling fit`, the figures and the report all read these fits (`sweep_fits`), so every
legend's formula is the one in fits.json.

Which runs reach which law (analysis.selection states the rules once):
- L(N) per series (family, sparsity value, site): each width at its best lr (mean final nmse over seeds),
  converged runs only (convergence judged from the curves, `analysis.fits.convergence`); when too few
  converged, the law is fitted at the token budget and says so. Bootstrap unit: the width (its seeds together).
- L(C) per series with at least 2 widths: the lower envelope of the training curves of every run of the
  series, every lr included (an envelope keeps the best of them by construction), each curve from 10% of its
  run's tokens on (the first steps are a transient of the initialisation, not compute-efficient training).
  Bootstrap unit: the run.
- L(n, k) (Gao et al. 2024, eq. 3) per architecture whose L0 is set by k (`Architecture.l0_set_by_k`: the TopK
  family) and site, over its cells of every k, each at its best lr (at least 2 k and 3 n). Bootstrap unit: the
  (n, k) cell.
- lr*(n) per series with at least 2 learning rates at each of at least 3 widths.
A law the data do not support is skipped with its reason.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from analysis.fits import Fit, convergence, fit_joint, fit_loc, fit_lofn, fit_lr, fits_table
from analysis.results import Sweeps, load_curves, load_runs, load_table, sweep_dirs
from analysis.selection import cell_labels, families, group_label, l0_set_by_k, series, usable
from orchestrator.store import ResultsStore, write_parquet_atomic
from sae_core.errors import DataError
from sae_core.io import write_json_atomic

LAWS = ("lofn", "loc", "joint", "lr")
TITLES = {"lofn": "L(N)", "loc": "L(C)", "joint": "L(n,k)", "lr": "lr*(n)"}
CURVE_START = 0.1  # fraction of a run's tokens before its curve enters the L(C) frontier
# bumped when a change here or in analysis.fits changes what a fit of the same data gives, so older
# fits.json files count as stale
FITS_VERSION = 4


def with_convergence(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The runs with a `converged` column judged from their curves (NA where a run has no curve)."""
    if runs.empty or curves.empty or "converged" in runs:
        return runs
    try:
        return runs.merge(convergence(curves)[["run_id", "converged"]], on="run_id", how="left")
    except DataError:
        return runs


def search_estimates(runs: pd.DataFrame, rungs: pd.DataFrame | None) -> pd.Series:
    """run_id -> a searched run's nmse at the full budget (orchestrator/search.py): the winner's own; a stopped
    run's, its nmse at the last rung it shares with its cell's winner times the winner's improvement from
    that rung to the budget (the winner's curve as the reference: the stopped run is assumed to gain what the
    winner gained from there). Empty for a sweep without a search."""
    if rungs is None or rungs.empty or "status" not in runs:
        return pd.Series(dtype=float)
    rec: dict[str, dict[int, float]] = {}
    for rid, rung, nmse in zip(rungs["run_id"], rungs["rung"], rungs["nmse"]):
        rec.setdefault(str(rid), {})[int(rung)] = float(nmse)
    d = runs[runs["status"].isin(["ok", "stopped"]) & runs["run_id"].isin(rec)]
    d = d.assign(family=families(d))
    out = {}
    for _, cell in d.groupby(cell_labels(d), sort=False):
        ok = cell[cell["status"] == "ok"]
        if ok.empty:
            continue
        won = rec[str(ok.loc[pd.to_numeric(ok["nmse"]).idxmin(), "run_id"])]
        final = max(won)
        for rid in cell["run_id"].astype(str):
            shared = max((r for r in rec[rid] if r in won), default=None)
            if shared is not None:
                out[rid] = rec[rid][shared] * won[final] / won[shared]
    return pd.Series(out, dtype=float)


def fit_runs(runs: pd.DataFrame, curves: pd.DataFrame | None = None, laws: tuple[str, ...] = LAWS,
             n_boot: int | None = None, rungs: pd.DataFrame | None = None) -> tuple[dict[str, Fit], dict[str, str]]:
    """Every law of `laws` the tables support: {name: Fit} (each with its `group`) and {name: why skipped}.
    rungs: a search's rung records (the lr law then takes each candidate at its search_estimates)."""
    curves = pd.DataFrame() if curves is None else curves
    boot = {} if n_boot is None else {"n_boot": n_boot}
    runs = with_convergence(runs, curves)
    ok, _ = usable(runs)
    fits: dict[str, Fit] = {}
    skipped: dict[str, str] = {}

    def attempt(law: str, group: dict, fn, frame: pd.DataFrame | None = None):
        """fn(converged_only) -> Fit. When too few runs of `frame` converged, the law is fitted at the token
        budget instead: its name says so and `flagged` lists the unconverged runs it used."""
        name = f"{TITLES[law]} {group_label(group)}"
        try:
            fit = fn(True)
        except DataError as err:
            reason = str(err)
            if frame is None or "not converged" not in reason:
                skipped[name] = reason
                return
            try:
                fit = fn(False)
            except DataError as err:
                skipped[name] = str(err)
                return
            fit.flagged = list(frame.run_id[frame.converged.eq(False).fillna(False)].astype(str))
            fit.at_budget, name = True, f"{name} at the token budget"
        fit.group = group
        fits[name] = fit

    # a search's stopped runs (orchestrator/search.py): their curves join L(C)'s frontier (the compute was
    # spent), and their estimated budget nmse the lr law's per-width optimum
    estimates = search_estimates(runs, rungs)
    with_stopped = {json.dumps(s.group, sort_keys=True, default=str): s.rows
                    for s in series(usable(runs, statuses=("ok", "stopped"))[0])}
    for s in series(ok):
        rows = s.rows
        everyone = with_stopped.get(json.dumps(s.group, sort_keys=True, default=str), rows)
        if "lofn" in laws:
            attempt("lofn", s.group, lambda conv, rows=rows: fit_lofn(rows, converged_only=conv, **boot), rows)
        if "loc" in laws and not curves.empty and rows.n_latents.nunique() >= 2:
            mine = curves[curves.run_id.isin(everyone.run_id)]
            if "tokens" in mine:
                mine = mine[mine.tokens >= CURVE_START * mine.groupby("run_id").tokens.transform("max")]
            attempt("loc", s.group, lambda conv, mine=mine: fit_loc(mine, **boot))
        if "lr" in laws and "lr" in rows:
            if not estimates.empty:  # every candidate at its estimate, the stopped as much as the winners
                rows = everyone.assign(nmse=everyone["run_id"].astype(str).map(estimates), status="ok")
                rows = rows.dropna(subset=["nmse"])
            swept = rows.groupby("n_latents").lr.nunique() >= 2  # widths with an lr sweep
            if swept.sum() >= 3:
                attempt("lr", s.group, lambda conv, rows=rows: fit_lr(rows, **boot))
            elif swept.any():
                skipped[f"{TITLES['lr']} {group_label(s.group)}"] = \
                    "needs at least 2 learning rates at each of at least 3 widths"
    if "joint" in laws and "k" in ok:
        for s in series(ok[ok.k.notna() & ok.family.map(l0_set_by_k).astype(bool)], by_sparsity=False):
            if s.rows.k.nunique() >= 2:
                attempt("joint", s.group, lambda conv, rows=s.rows: fit_joint(rows, converged_only=conv, **boot),
                        s.rows)
    return fits, skipped


def fit_sweep(sweep_dir: Sweeps, laws: tuple[str, ...] = LAWS,
              all_runs: bool = False) -> tuple[dict[str, Fit], dict[str, str]]:
    """Fits by name, and the reason each skipped law was skipped. all_runs: also the rows of grid points
    since removed from the sweep."""
    runs = load_runs(sweep_dir, all_runs)
    if runs.empty:
        raise DataError(f"{', '.join(map(str, sweep_dirs(sweep_dir)))}: no finished runs to fit")
    return fit_runs(runs, load_curves(sweep_dir, all_runs), laws, rungs=load_table(sweep_dir, "rungs", all_runs))


def fingerprint(sweep_dir: Sweeps, all_runs: bool = False) -> str:
    """A hash of the tables the fits read (the counted runs' runs/, curves/ and rungs/ files) and of the
    fitting rules' version."""
    h = hashlib.sha256(f"fits v{FITS_VERSION}{' all runs' if all_runs else ''}".encode())
    for path in sweep_dirs(sweep_dir):
        store = ResultsStore.at(path)
        for table in ("runs", "curves", "rungs"):
            for f in store.files(table, all_runs):
                h.update(f"{table}/{f.name}".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def write_fits(sweep_dir: Sweeps, fits: dict[str, Fit], skipped: dict[str, str],
               laws: tuple[str, ...] = LAWS, inputs: str | None = None, out: str | Path | None = None) -> Path:
    """inputs: the tables' fingerprint when the caller has it (the tables the fits were fitted to); out: the
    folder (default <sweep_dir>/fits, where figures and the report look for them)."""
    out = Path(out) if out is not None else Path(sweep_dir) / "fits"  # several sweeps: `out` is given
    write_json_atomic(out / "fits.json", {"inputs": inputs or fingerprint(sweep_dir), "laws": list(laws),
                                          "fits": {name: f.to_dict() for name, f in fits.items()},
                                          "skipped": skipped})
    if fits:
        table = fits_table(fits)
        write_parquet_atomic(out / "fits.parquet", json.loads(table.to_json(orient="records")))
    return out


def read_fits(sweep_dir: str | Path, inputs: str | None = None) -> tuple[dict[str, Fit], dict[str, str]] | None:
    """The fits `sae-scaling fit` wrote, if they cover every law and were fitted to the tables as they are
    now (`inputs`: their fingerprint, when the caller has it); None when fits/ is missing, unreadable,
    partial or stale."""
    path = Path(sweep_dir) / "fits" / "fits.json"
    try:
        data = json.loads(path.read_text())
        if data.get("inputs") != (inputs or fingerprint(sweep_dir)) or set(data.get("laws", ())) != set(LAWS):
            return None
        return {name: Fit.from_dict(d) for name, d in data["fits"].items()}, dict(data.get("skipped", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_fits(sweep_dir: Sweeps, all_runs: bool = False) -> tuple[dict[str, Fit], dict[str, str]]:
    """The sweep's fits: fits.json when it is current, else fitted now and written (where the folder is
    writable: on read-only storage the fits are used without being saved). Several sweeps together are fitted
    now: no sweep's folder holds their fits."""
    if len(sweep_dirs(sweep_dir)) > 1:
        return fit_sweep(sweep_dir, all_runs=all_runs)
    sweep_dir = sweep_dirs(sweep_dir)[0]
    inputs = fingerprint(sweep_dir, all_runs)  # hashing every table once, for the check and the write
    current = read_fits(sweep_dir, inputs)
    if current is not None:
        return current
    fits, skipped = fit_sweep(sweep_dir, all_runs=all_runs)
    try:
        write_fits(sweep_dir, fits, skipped, inputs=inputs)
    except OSError:
        pass
    return fits, skipped


def find_fit(fits: dict[str, Fit], law: str, group: dict) -> tuple[str, Fit] | None:
    """The fit of `law` whose group is `group` (an L(N) fitted at the token budget included)."""
    for name, fit in fits.items():
        if fit.law == law and fit.group == group:
            return name, fit
    return None


def print_fits(fits: dict[str, Fit], skipped: dict[str, str], echo=print) -> None:
    for name, f in fits.items():
        ci = ", ".join(f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in f.ci.items())
        hold = f.holdout.get("max_rel_error") if f.holdout else None
        echo(f"{name}: {f.formula}   (R² {f.r2:.3f}, {f.n_points} points from {len(f.runs)} runs"
             + (f", largest held out: {hold:.1%} error" if hold is not None else "") + ")")
        echo(f"    95% CI: {ci}")
        if f.flagged:
            echo(f"    not converged: {', '.join(f.flagged)}")
    for name, reason in skipped.items():
        echo(f"{name}: skipped ({reason})")
