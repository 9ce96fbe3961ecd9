"""A sweep's results as pandas DataFrames: one row per run, and the per-run tables concatenated.

    runs = load_runs("results/my-sweep")          # status, config and held-out metrics per run
    curves = load_curves("results/my-sweep")      # training curves of every run
Integer columns with nulls stay integers (pandas Int64); files being written are never read (they carry a
temporary name until complete).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sae_core.errors import DataError

_TYPES = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _sweep_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / "runs").is_dir() and not (path / "sweep.yaml").is_file():
        raise DataError(f"{path}: not a sweep's results folder (it holds sweep.yaml and runs/); "
                        "give results/<sweep name>")
    return path


def load_table(path: str | Path, table: str) -> pd.DataFrame:
    """All `<table>/<run_id>.parquet` files of a sweep (runs, curves, layers, recovery) as one DataFrame."""
    files = sorted((_sweep_dir(path) / table).glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    merged = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    return merged.to_pandas(types_mapper=_TYPES.get)


def load_runs(path: str | Path) -> pd.DataFrame:
    return load_table(path, "runs")


def load_curves(path: str | Path) -> pd.DataFrame:
    return load_table(path, "curves")


def load_recovery(path: str | Path) -> pd.DataFrame:
    return load_table(path, "recovery")


def load_layers(path: str | Path) -> pd.DataFrame:
    return load_table(path, "layers")
