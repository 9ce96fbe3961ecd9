"""Everything evaluated on a trained SAE beside its reconstruction metrics: downstream loss by splicing
(per layer for multi-layer SAEs, then averaged, Lawson et al. B.2), per-layer reconstruction metrics, and
the progressive-recovery table. All spliced forwards share one clean forward per batch of held-out rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from sae_core.evaluation import recovery
from sae_core.evaluation.ablation import ABLATION_COLUMNS, evaluate_ablation
from sae_core.evaluation.cross_layer import evaluate_cross_layer
from sae_core.evaluation.downstream import (
    DownstreamEval,
    constant,
    downstream_row,
    null_downstream,
    reconstruction,
    zeros,
)
from sae_core.evaluation.probe import PROBE_COLUMNS, evaluate_probes
from sae_core.evaluation.probe_datasets import ProbeTaskSpec
from sae_core.evaluation.reconstruction import evaluate
from sae_core.evaluation.refinement import refine
from sae_core.sae import SAE

NonNegative = Field(ge=0, allow_inf_nan=False)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    downstream: bool = True  # splice the reconstruction into the model (needs model + text data)
    downstream_tokens: int | None = Field(None, ge=1)  # held-out tokens spliced; None: all of data.eval_tokens
    batch_tokens: int = Field(4096, ge=1)  # tokens per forward pass (the logits of a batch must fit in memory)
    recovery: bool = True  # progressive-recovery table (test-time TopK(k') and JumpReLU(θ))
    recovery_k: list[PositiveInt] | Literal["auto"] = "auto"  # test-time k' values; auto: powers of 2 up to 4k, and k
    # test-time JumpReLU thresholds θ; auto: the mean k'-th largest pre-activation, one per k'
    recovery_thresholds: list[float] | Literal["auto"] = "auto"
    recovery_downstream: bool = True  # also splice every recovery point (one forward per point and batch)
    # re-fit the active latents' values with the decoder frozen (NNLS), for refined_nmse, shrinkage and
    # refinement_mean: how much the activations are shrunk (Gao et al. 2024, §5.1, Fig. 9)
    refinement: bool = True
    refinement_vectors: int = Field(2048, ge=1)  # held-out vectors refined (the first ones; all layers pooled)
    # at most this many active latents refined per vector (the largest; the others stay frozen): bounds the
    # cost of L1 families' large active sets
    refinement_max_active: int = Field(128, ge=1)
    # probe loss (Gao et al. 2024, §4): the best single latent's 1-D logistic regression loss on built-in
    # token tasks and the user's probe_tasks, and the same over the input's coordinates (needs the model;
    # multi-layer SAEs: first layer). About 1 s per run at the quickstart's sizes (2 CPU cores), and 2-3 s
    # once per worker for the input's baseline
    probe: bool = True
    # held-out positions probed by the built-in tasks (the first ones); at most this many tokens per token-level
    # user task
    probe_tokens: int = Field(4096, ge=1)
    probe_builtin: bool = True  # run the built-in tasks (sae_core/evaluation/probe_tasks.py)
    # user tasks: name, path (.jsonl/.csv/.parquet) or dataset (+ split), text_column, label_column,
    # level (token | sequence), max_examples; see docs/metrics.md, Probe loss
    probe_tasks: list[ProbeTaskSpec] = []
    # sparsity of ablation effects (Gao et al. 2024, §4.5): ablate one latent at one position and measure how
    # concentrated the change of the model's next `ablation_window` outputs is, on a seeded subsample of
    # (latent, position) pairs, beside residual-channel ablations (needs the model; multi-layer SAEs: first
    # layer). Off by default: it adds two forwards of a row per sample
    ablation: bool = False
    ablation_latents: int = Field(32, ge=1)  # latents sampled (uniformly among those active on held-out positions)
    ablation_positions: int = Field(4, ge=1)  # positions sampled per latent (among those where it is active)
    ablation_window: int = Field(16, ge=1)  # T: outputs at t..t+T-1 measured, t the ablated position (paper: 16)

    @field_validator("probe_tasks")
    @classmethod
    def _unique_task_names(cls, tasks: list[ProbeTaskSpec]) -> list[ProbeTaskSpec]:
        names = [t.name for t in tasks]
        if len(set(names)) < len(names):
            raise ValueError(f"task names must be unique (got {', '.join(names)})")
        return tasks


# the per-run tables an evaluation may return, each written as results/<sweep>/<table>/<run_id>.parquet;
# layer_spread, layer_profile and adjacent_cosine: multi-layer SAEs only (sae_core.evaluation.cross_layer)
RUN_TABLES = ("layers", "recovery", "layer_spread", "layer_profile", "adjacent_cosine", "probes")


@dataclass
class RunEvaluation:
    metrics: dict  # columns of the runs table (downstream loss, ...)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # RUN_TABLES name -> rows

    @property
    def layers(self) -> list[dict]:  # multi-layer SAEs: one row per layer
        return self.tables.get("layers", [])

    @property
    def recovery(self) -> list[dict]:  # progressive recovery: one row per grid point
        return self.tables.get("recovery", [])


def _mean(rows: list[dict]) -> dict:
    """Average of per-layer rows: numbers averaged (null if any layer's is null), the rest from the first."""
    out = dict(rows[0])
    for key, value in out.items():
        if isinstance(value, float) or key == "downstream_tokens":
            vals = [r[key] for r in rows]
            out[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    return out


def evaluate_run(sae: SAE, eval_x: torch.Tensor, cfg: EvalConfig, layers: list[int],
                 downstream: DownstreamEval | None, null_reason: str | None = None,
                 layer_ids: torch.Tensor | None = None, l0: float | None = None,
                 batch_size: int = 4096) -> RunEvaluation:
    """layers: the hooked layers the SAE reads (several for a multi-layer SAE, whose eval vectors' layers are
    `layer_ids`; its recovery points' nmse and mse are then the mean over layers, as the runs row's);
    downstream: None when there is no model to splice into, `null_reason` saying why.
    l0: the trained L0 (sets the default recovery grid for families without k)."""
    splice = cfg.downstream and downstream is not None and bool(layers)
    splices: dict = {}
    if splice:
        for layer in layers:
            downstream.check(sae, layer)
        for layer in layers:
            splices["sae", layer] = (layer, reconstruction(sae))
            splices["zero", layer] = (layer, zeros)
            splices["mean", layer] = (layer, constant(downstream.site_mean(layer)))
    grid = []
    if cfg.recovery:
        if l0 is None:
            l0 = evaluate(sae, eval_x, batch_size).metrics["l0"]
        ks = recovery.k_grid(sae, l0) if cfg.recovery_k == "auto" else sorted(set(cfg.recovery_k))
        ks = [k for k in ks if k <= sae.cfg.n_latents]
        thresholds = (recovery.threshold_grid(sae, eval_x, ks) if cfg.recovery_thresholds == "auto"
                      else sorted(set(cfg.recovery_thresholds), reverse=True))
        grid = recovery.points(sae, ks, thresholds)
        if splice and cfg.recovery_downstream:
            for i, (_, encode) in enumerate(grid):
                for layer in layers:
                    splices["recovery", i, layer] = (layer, reconstruction(sae, encode))
    clean_ce, spliced = downstream.measure(splices) if splices else (None, {})

    def layer_row(layer: int) -> dict:
        return downstream_row(downstream.metric, downstream.n_tokens, clean_ce, spliced["sae", layer],
                              spliced["zero", layer], spliced["mean", layer])

    if splice:
        metrics = _mean([layer_row(layer) for layer in layers])
    else:
        reason = null_reason or ("eval.downstream is off" if not cfg.downstream else "no hooked layer")
        metrics = null_downstream(reason)

    per_layer = []
    if layer_ids is not None:
        for layer in layers:
            rec = evaluate(sae, eval_x[layer_ids == layer], batch_size).metrics
            down = layer_row(layer) if splice else null_downstream(metrics["downstream_null_reason"])
            per_layer.append({"layer": layer, **{k: rec[k] for k in ("nmse", "mse", "l0", "l1")}, **down})

    table = []
    scalars = recovery.evaluate_points(sae, eval_x, [keys for keys, _ in grid], batch_size, layer_ids)  # as the row
    for i, ((keys, _), rec) in enumerate(zip(grid, scalars)):
        row = {**keys, "l0": rec["l0"], "nmse": rec["nmse"], "mse": rec["mse"],
               "downstream_loss": None, "downstream_kl": None}
        if ("recovery", i, layers[0] if layers else None) in spliced:
            points = [spliced["recovery", i, layer] for layer in layers]
            row["downstream_loss"] = math.fsum(p.loss for p in points) / len(points)
            if clean_ce is not None:
                row["downstream_kl"] = math.fsum(p.kl for p in points) / len(points)
        table.append(row)
    tables = {"layers": per_layer, "recovery": table}
    if layer_ids is not None:  # a multi-layer SAE: how its latents spread over the layers (cross_layer.py)
        cross, cross_tables = evaluate_cross_layer(sae, eval_x, layer_ids, torch.unique(layer_ids).tolist(),
                                                   batch_size)
        metrics = {**metrics, **cross}
        tables.update(cross_tables)
    metrics = {**metrics, **_refinement_columns(sae, eval_x, cfg, batch_size)}
    # probe loss (probe.py): on the SAE's first hooked layer, so a multi-layer SAE is probed where it starts
    probe_metrics, tables["probes"] = dict.fromkeys(PROBE_COLUMNS), []
    if cfg.probe and downstream is not None and layers:
        probe_metrics, tables["probes"] = evaluate_probes(sae, downstream, layers[0], cfg.probe_tokens,
                                                          cfg.probe_tasks, cfg.probe_builtin)
    metrics = {**metrics, **probe_metrics}
    # ablation sparsity (ablation.py): at the first hooked layer too, as the probe
    if cfg.ablation and downstream is not None and layers:
        metrics.update(evaluate_ablation(sae, downstream, layers[0], cfg.ablation_latents, cfg.ablation_positions,
                                         cfg.ablation_window))
    else:
        metrics.update(dict.fromkeys(ABLATION_COLUMNS))
    return RunEvaluation(metrics, tables)


def _refinement_columns(sae: SAE, eval_x: torch.Tensor, cfg: EvalConfig, batch_size: int) -> dict:
    """refined_nmse, shrinkage, refinement_mean on the first cfg.refinement_vectors held-out vectors (a
    multi-layer SAE's pooled over its layers); null when off or for a sharded SAE, whose decoder is split."""
    keys = ("refined_nmse", "shrinkage", "refinement_mean")
    if not cfg.refinement or sae.net.mesh.shards > 1 or eval_x.shape[0] == 0:
        return dict.fromkeys(keys)
    res = refine(sae, eval_x[:cfg.refinement_vectors], cfg.refinement_max_active, batch_size)
    return {k: res.metrics[k] for k in keys}
