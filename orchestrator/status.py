"""`sae-scaling status` and `sae-scaling results`: what a sweep's store holds, read without Ray."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import load_runs
from orchestrator.store import DONE, ResultsStore
from sae_core.errors import ConfigError, DataError


def _store(sweep_dir: str | Path) -> ResultsStore:
    path = Path(sweep_dir).expanduser().resolve()
    if not (path / "sweep.yaml").is_file():
        raise DataError(f"{sweep_dir}: not a sweep's results folder (no sweep.yaml); give results/<sweep name>")
    return ResultsStore(path.parent, path.name)


def sweep_status(sweep_dir: str | Path) -> str:
    store = _store(sweep_dir)
    rows, running, planned = store.rows(), store.running(), store.plan()
    ids = [r["run_id"] for r in planned] or list(rows)
    state = {rid: rows[rid]["status"] if rid in rows and rows[rid]["status"] in DONE
             else "running" if rid in running else rows.get(rid, {}).get("status", "pending") for rid in ids}
    counts = {s: sum(v == s for v in state.values()) for s in ("ok", "diverged", "running", "failed", "pending")}
    lines = [f"{store.sweep}: {len(ids)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for rid, s in state.items():
        if s in ("failed", "diverged"):
            lines.append(f"  {rid} {s}: {(rows[rid].get('error') or '').strip().splitlines()[-1:] or ''}")
    progress = store.progress()
    for rid in (r for r, s in state.items() if s == "running"):
        p = progress.get(rid, {})
        lines.append(f"  {rid} running: {p.get('tokens', 0):,} / {p.get('total', 0):,} tokens")
    return "\n".join(lines)


def results_table(sweep_dir: str | Path, query: str | None = None, columns: str | None = None,
                  fmt: str = "table") -> str:
    runs = load_runs(_store(sweep_dir).dir)
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
