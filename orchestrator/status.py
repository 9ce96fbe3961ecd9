"""`sae-scaling status` and `sae-scaling results`, and the table a finished `run` prints: what a sweep's store
holds, read without Ray and without writing (they work on read-only storage)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from orchestrator.store import ResultsStore
from sae_core.errors import ConfigError

SUMMARY_COLUMNS = ["arch", "layer", "n_latents", "k", "l1_coeff", "lr", "seed", "status", "nmse", "l0",
                   "dead_frac", "downstream_loss", "wall_seconds"]


def last_line(text: str | None) -> str:
    """A failure's reason: the last line of its error (a traceback's is the exception)."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def sweep_status(sweep_dir: str | Path) -> tuple[str, bool]:
    """The status text, and False when some run's files are unreadable (the command then exits non-zero)."""
    store = ResultsStore.at(sweep_dir)
    planned = store.plan()
    ids = [r["run_id"] for r in planned] or [p.stem for p in sorted((store.dir / "runs").glob("*.parquet"))]
    states = store.states(ids)
    broken = {rid: s.problems for rid, s in states.items() if s.status == "broken"}
    stopped = ("stopped",) if any(s.status == "stopped" for s in states.values()) else ()  # by a search
    kinds = ("ok", "diverged", *stopped, "running", "failed", "pending") + (("broken",) if broken else ())
    counts = {k: sum(s.status == k for s in states.values()) for k in kinds}
    lines = [f"{store.sweep}: {len(ids)} runs: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    for rid, s in states.items():
        if s.status in ("failed", "diverged"):
            lines.append(f"  {rid} {s.status}: {last_line(s.row.get('error'))}")
    for rid, problems in broken.items():
        for path, why in problems:
            lines.append(f"  {rid} broken: {path}: unreadable ({why})")
    if broken:
        lines.append("  run the sweep again (`sae-scaling run SWEEP.yaml`) to set the broken files aside and train "
                     "those runs anew")
    progress = store.progress()
    for rid in (r for r, s in states.items() if s.status == "running"):
        p = progress.get(rid, {})
        lines.append(f"  {rid} running: {p.get('tokens', 0):,} / {p.get('total', 0):,} tokens")
    return "\n".join(lines), not broken


def results_table(sweep_dir: str | Path, query: str | None = None, columns: str | None = None,
                  fmt: str = "table", all_runs: bool = False) -> str:
    runs = ResultsStore.at(sweep_dir).table("runs", all_runs)
    if query:
        try:
            runs = runs.query(query)
        except Exception as err:  # pandas raises many types for a bad expression
            raise ConfigError(f"--query {query!r}: {type(err).__name__}: {err}; columns: "
                              f"{', '.join(runs.columns)}") from None
    if columns:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        missing = [c for c in wanted if c not in runs.columns]
        if missing:
            raise ConfigError(f"--columns: unknown {', '.join(missing)}; allowed: {', '.join(runs.columns)}")
        runs = runs[wanted]
    if fmt == "csv":
        return runs.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return runs.to_json(orient="records", date_format="iso")
    with pd.option_context("display.max_columns", None, "display.width", 200):
        return runs.to_string(index=False) if len(runs) else "(no runs)"


def summary(store: ResultsStore, echo: Callable[[str], None] = print) -> None:
    runs = store.table("runs")
    if runs.empty:
        return
    cols = [c for c in SUMMARY_COLUMNS if c in runs and runs[c].notna().any()]
    table = runs.sort_values([c for c in ("arch", "layer", "n_latents", "k", "l1_coeff") if c in cols])[cols]
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
