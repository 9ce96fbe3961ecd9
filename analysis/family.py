"""SAE-family comparison over a whole sweep (Leask et al. 2025): the finished SAEs that differ only in
width (same architecture, k or l1_coeff, layer and seed) form a family; consecutive widths are compared on
the sweep's held-out vectors with `sae_core.evaluation.family.compare_pair`.

    table = family_table("results/leask2025-family")   # one row per (family, consecutive pair of widths)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import load_runs
from orchestrator.spec import load_spec
from orchestrator.store import ResultsStore
from sae_core.data import ActivationData
from sae_core.errors import DataError
from sae_core.evaluation.family import compare_family
from sae_core.sae import SAE

FAMILY_KEYS = ("arch", "k", "l1_coeff", "layer", "seed")


def family_table(sweep_dir: str | Path, threshold: float = 0.7, max_vectors: int = 8192,
                 device: str = "cpu") -> pd.DataFrame:
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    runs = load_runs(sweep_dir)
    if runs.empty:
        raise DataError(f"{sweep_dir}: no finished runs")
    runs = runs[runs.status == "ok"]
    spec = load_spec(sweep_dir / "sweep.yaml")
    store = ResultsStore(sweep_dir.parent, sweep_dir.name)
    data = ActivationData(spec.model, spec.hook, spec.data).prepare()
    keys = [k for k in FAMILY_KEYS if k in runs]
    rows = []
    for group, members in runs.groupby(keys, dropna=False):
        if members.n_latents.nunique() < 2:
            continue
        layer = dict(zip(keys, group)).get("layer")
        layer = None if layer is None or pd.isna(layer) else int(layer)
        x = data.source(layer, seed=spec.data_seed).eval_set()[:max_vectors]
        saes = [SAE.load(store.sae_dir(rid), device=device) for rid in members.drop_duplicates("n_latents").run_id]
        table = compare_family(saes, x, threshold)
        for key, value in zip(keys, group):
            table[key] = value
        rows.append(table)
    if not rows:
        raise DataError(f"{sweep_dir}: no two finished SAEs differ only in n_latents; a family needs several widths "
                        f"with the same {', '.join(keys)}")
    return pd.concat(rows, ignore_index=True)
