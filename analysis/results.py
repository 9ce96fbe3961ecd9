"""A sweep's results as pandas DataFrames: one row per run, and the per-run tables concatenated.

    runs = load_runs("results/my-sweep")          # status, config and held-out metrics per run
    curves = load_curves("results/my-sweep")      # training curves of every run
Only the runs the sweep holds now count (its plan.json); `all_runs=True` adds the rows of grid points since
removed from the sweep. Integer columns with nulls stay integers (pandas Int64); files being written are
never read (they carry a temporary name until complete); an unreadable file raises an error naming it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.store import ResultsStore


def load_table(path: str | Path, table: str, all_runs: bool = False) -> pd.DataFrame:
    """All `<table>/<run_id>.parquet` files of a sweep (runs, curves, layers, recovery) as one DataFrame."""
    return ResultsStore.at(path).table(table, all_runs)


def load_runs(path: str | Path, all_runs: bool = False) -> pd.DataFrame:
    return load_table(path, "runs", all_runs)


def load_curves(path: str | Path, all_runs: bool = False) -> pd.DataFrame:
    return load_table(path, "curves", all_runs)


def load_recovery(path: str | Path, all_runs: bool = False) -> pd.DataFrame:
    return load_table(path, "recovery", all_runs)


def load_layers(path: str | Path, all_runs: bool = False) -> pd.DataFrame:
    return load_table(path, "layers", all_runs)
