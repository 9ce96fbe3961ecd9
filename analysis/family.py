"""SAE-family comparison over a whole sweep (Leask et al. 2025): the finished SAEs that differ only in
width (analysis.selection.width_families: same architecture, sparsity, site, other swept keys and seed, each
at its best lr) form a family; consecutive widths are compared on the sweep's held-out vectors with
`sae_core.evaluation.family.compare_pair`.

    table = family_table("results/leask2025-family")   # one row per (family, consecutive pair of widths)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import load_runs
from analysis.selection import width_families
from orchestrator.spec import load_spec
from orchestrator.store import ResultsStore
from sae_core.data import ActivationData
from sae_core.errors import DataError
from sae_core.evaluation.family import compare_family
from sae_core.sae import SAE


def family_table(sweep_dir: str | Path, threshold: float = 0.7, max_vectors: int = 8192,
                 device: str = "cpu") -> pd.DataFrame:
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    runs = load_runs(sweep_dir)
    if runs.empty:
        raise DataError(f"{sweep_dir}: no finished runs")
    spec = load_spec(sweep_dir / "sweep.yaml")
    store = ResultsStore(sweep_dir.parent, sweep_dir.name)
    data = ActivationData(spec.model, spec.hook, spec.data).prepare()
    rows = []
    for group, members in width_families(runs):
        layer = group.get("layer")
        x = data.source(None if layer is None else int(layer), seed=spec.data_seed).eval_set()[:max_vectors]
        saes = [SAE.load(store.sae_dir(rid), device=device) for rid in members.run_id]
        table = compare_family(saes, x, threshold)
        for key, value in group.items():
            table[key] = value
        rows.append(table)
    if not rows:
        raise DataError(f"{sweep_dir}: no two finished SAEs differ only in n_latents; a family needs several widths "
                        "with the same architecture, sparsity, layer, other swept settings and seed")
    return pd.concat(rows, ignore_index=True)
