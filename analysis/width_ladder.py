"""Width ladders over a whole sweep (the "SAE families" of Leask et al. 2025; here a ladder, since "family"
names an architecture family): the finished SAEs that differ only in width (analysis.selection.width_ladders:
same architecture, sparsity, site, other swept keys and seed, each at its best lr) form a ladder; consecutive widths are compared on the sweep's held-out vectors with
`sae_core.evaluation.width_ladder.compare_pair`.

    table = ladder_table("results/leask2025-family")   # one row per (ladder, consecutive pair of widths)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import load_runs
from analysis.selection import width_ladders
from orchestrator.spec import load_spec
from orchestrator.store import ResultsStore
from sae_core.activation_data import ActivationData
from sae_core.errors import DataError
from sae_core.evaluation.width_ladder import compare_ladder
from sae_core.sae import SAE


def ladder_table(sweep_dir: str | Path, threshold: float = 0.7, max_vectors: int = 8192,
                 device: str = "cpu") -> pd.DataFrame:
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    runs = load_runs(sweep_dir)
    if runs.empty:
        raise DataError(f"{sweep_dir}: no finished runs")
    spec = load_spec(sweep_dir / "sweep.yaml")
    store = ResultsStore(sweep_dir.parent, sweep_dir.name)
    # a ladder reads one model (`model` is a cell key): its single-model sweep's data, prepared once
    datas = {one.model: one for one in spec.per_model()}
    prepared: dict = {}
    rows = []
    for group, members in width_ladders(runs):
        layer, one = group.get("layer"), datas.get(group.get("model"), spec)
        if one.model not in prepared:
            prepared[one.model] = ActivationData(one.model, one.hook, one.data).prepare()
        data = prepared[one.model]
        x = data.source(None if layer is None else int(layer), seed=spec.data_seed).eval_set()[:max_vectors]
        saes = [SAE.load(store.sae_dir(rid), device=device) for rid in members.run_id]
        table = compare_ladder(saes, x, threshold)
        for key, value in group.items():
            table[key] = value
        rows.append(table)
    if not rows:
        raise DataError(f"{sweep_dir}: no two finished SAEs differ only in n_latents; a family needs several widths "
                        "with the same architecture, sparsity, layer, other swept settings and seed")
    return pd.concat(rows, ignore_index=True)
