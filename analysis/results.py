"""A sweep's results as pandas DataFrames: one row per run, and the per-run tables concatenated.

    runs = load_runs("results/my-sweep")          # status, config and held-out metrics per run
    curves = load_curves("results/my-sweep")      # training curves of every run
Only the runs the sweep holds now count (its plan.json); `all_runs=True` adds the rows of grid points since
removed from the sweep. A list of sweep folders gives their tables together (to compare sweeps of different
models, say); a run two sweeps share counts once, from the first sweep that has it. Integer columns with
nulls stay integers (pandas Int64); files being written are never read (they carry a temporary name until
complete); an unreadable file raises an error naming it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from orchestrator.store import ResultsStore

Sweeps = str | Path | Sequence[str | Path]  # one sweep folder, or several read together


def sweep_dirs(paths: Sweeps) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def sae_dir(paths: Sweeps, run_id: str) -> Path:
    """The folder of a run's SAE: in the first sweep that has it (the first sweep's, if none has)."""
    dirs = [d / "saes" / run_id for d in sweep_dirs(paths)]
    return next((d for d in dirs if d.is_dir()), dirs[0])


def saes_where(paths: Sweeps) -> str:
    """Where sae_dir looks, for messages."""
    return " or ".join(str(d / "saes") for d in sweep_dirs(paths))


def load_table(paths: Sweeps, table: str, all_runs: bool = False) -> pd.DataFrame:
    """All `<table>/<run_id>.parquet` files of a sweep (runs, curves, layers, recovery, ...) as one DataFrame;
    of several sweeps, each run's rows from the first sweep that has it."""
    frames, seen = [], set()
    for path in sweep_dirs(paths):
        frame = ResultsStore.at(path).table(table, all_runs)
        if "run_id" in frame and seen:
            frame = frame[~frame["run_id"].isin(seen)]
        seen |= set(frame["run_id"]) if "run_id" in frame else set()
        frames.append(frame)
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else pd.DataFrame())


def load_runs(paths: Sweeps, all_runs: bool = False) -> pd.DataFrame:
    return load_table(paths, "runs", all_runs)


def load_curves(paths: Sweeps, all_runs: bool = False) -> pd.DataFrame:
    return load_table(paths, "curves", all_runs)


def load_recovery(paths: Sweeps, all_runs: bool = False) -> pd.DataFrame:
    return load_table(paths, "recovery", all_runs)


def load_layers(paths: Sweeps, all_runs: bool = False) -> pd.DataFrame:
    return load_table(paths, "layers", all_runs)
