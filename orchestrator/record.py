"""An SAE's row in a sweep's results: evaluated on the sweep's held-out data (downstream loss by splicing,
per-layer metrics, progressive recovery) and written with its tables. A run trained here
(orchestrator/worker.py) and an SAE trained elsewhere (orchestrator/import_saes.py) are both recorded by
`record`, so their rows are alike; a run that ended without an SAE worth evaluating gets `runs_row` alone.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from orchestrator.plan import RunPlan, data_identity
from orchestrator.spec import SweepSpec
from orchestrator.store import ResultsStore
from sae_core.activation_data import ActivationData
from sae_core.evaluation.downstream import DownstreamEval
from sae_core.evaluation.run import evaluate_run
from sae_core.sae import SAE
from sae_core.sources.base import ActivationSource
from sae_core.trainer import RunResult

Splicer = Callable[[], tuple[DownstreamEval | None, str | None]]  # the model to splice into, or why there is none


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Identity:
    """What an SAE's row is known by: its id, the columns describing it, and its config_json."""

    run_id: str
    arch: str
    layer: int | None  # the hooked layer it reads; None: every hooked layer (multi-layer SAE), or no layers
    axes: dict  # its grid values: each one is a column
    sae: dict  # its config
    train: dict  # its training settings
    inputs: dict | None = None  # the input digests it was planned with (data_identity); None: taken now

    @classmethod
    def of_plan(cls, plan: RunPlan) -> Identity:
        # a plan without settings predates input digests: its row takes them now
        return cls(plan.run_id, plan.arch, plan.layer, plan.axes, plan.sae, plan.train,
                   plan.inputs if plan.settings else None)


@dataclass(frozen=True)
class Outcome:
    """How an SAE came to be and how it does on the held-out data, as its row records it."""

    status: str  # ok | diverged | stopped | failed
    metrics: dict = field(default_factory=dict)  # held-out nmse, mse, l0, l1, dead_frac_eval, ...
    error: str | None = None
    device: str | None = None
    ema_used: bool | None = None
    # what training took: null for an SAE trained elsewhere
    lr: float | None = None
    tokens: int | None = None
    steps: int | None = None
    flops: float | None = None
    wall_seconds: float | None = None

    @classmethod
    def of_training(cls, result: RunResult | None, error: str | None = None) -> Outcome:
        """A run trained here; result None: it failed (`error` says how)."""
        if result is None:
            return cls("failed", error=error)
        return cls(result.status, result.metrics, result.error or error, result.device, result.ema_used,
                   result.lr, result.tokens, result.steps, result.flops, result.wall_seconds)


@dataclass(frozen=True)
class EvalInputs:
    """What an SAE is evaluated on beside its reconstruction: the sweep's held-out vectors and its model."""

    eval_x: torch.Tensor
    layer_ids: torch.Tensor | None  # a multi-layer SAE's: the layer of each row of eval_x
    layers: list[int]  # the hooked layers it reads, spliced into; none without a model
    splicer: Splicer

    @classmethod
    def of(cls, spec: SweepSpec, data: ActivationData, source: ActivationSource, layer: int | None,
           splicer: Splicer) -> EvalInputs:
        """source: the activations of `layer` (None: every hooked layer) the SAE reads."""
        has_model = spec.data.has_model
        return cls(source.eval_set(), source.eval_layer_ids() if layer is None and has_model else None,
                   [] if not has_model else ([layer] if layer is not None else data.layers), splicer)


def splicer_of(spec: SweepSpec, data: ActivationData) -> Splicer:
    """The model and held-out rows for splicing, loaded once per worker when the first SAE needs them."""
    return functools.cache(lambda: data.downstream(spec.eval.batch_tokens, spec.eval.downstream_tokens)
                           if spec.eval.downstream else (None, "eval.downstream is off"))


def runs_row(spec: SweepSpec, identity: Identity, outcome: Outcome, evaluation: dict, started: datetime,
             hooked: list[int] | None = None) -> dict:
    """The runs-table row (columns in docs/results.md). evaluation: its downstream columns. hooked: the hooked
    layers resolved (hook.layers `all` made a list by ActivationData.prepare); without it `all` is written as
    it is."""
    layers = (hooked or spec.hook.layers) if identity.layer is None else [identity.layer]
    layers = layers if isinstance(layers, str) else ",".join(map(str, layers))
    row = {
        "run_id": identity.run_id, "sweep": spec.name, "status": outcome.status, "error": outcome.error,
        "arch": identity.arch, "n_latents": identity.sae["n_latents"],
        "expansion_factor": identity.axes.get("expansion_factor"), "k": identity.sae.get("k"), "lr": outcome.lr,
        "l1_coeff": identity.sae.get("l1_coeff"), "seed": identity.train["seed"], "model": spec.model,
        "hook": spec.hook.site if spec.data.has_model else None, "layer": identity.layer,
        "layers": layers if spec.data.has_model else None, "d_in": identity.sae["d_in"],
        "batch_size": identity.train["batch_size"], "tokens": outcome.tokens, "steps": outcome.steps,
        "flops": outcome.flops, "wall_seconds": outcome.wall_seconds, "device": outcome.device, **outcome.metrics,
        "ema_used": outcome.ema_used, **evaluation,
        "config_json": json.dumps({"sae": identity.sae, "train": identity.train, "axes": identity.axes,
                                   "data": data_identity(spec, identity.inputs),
                                   "eval": spec.eval.model_dump(mode="json")},
                                  sort_keys=True, default=str),
        "started_at": started, "finished_at": now_utc(),
    }
    return {**row, **{k: v for k, v in identity.axes.items() if k not in row}}  # every swept key is a column


def record(spec: SweepSpec, store: ResultsStore, identity: Identity, sae: SAE, inputs: EvalInputs,
           outcome: Outcome, started: datetime, hooked: list[int] | None = None, curve: list[dict] = ()) -> dict:
    """Evaluate an SAE whose outcome holds its held-out reconstruction metrics, and write its row with its
    curve, per-layer and recovery tables; returns the row."""
    downstream, reason = inputs.splicer()
    evaluation = evaluate_run(sae, inputs.eval_x, spec.eval, inputs.layers, downstream, reason,
                              layer_ids=inputs.layer_ids, l0=outcome.metrics["l0"])
    row = runs_row(spec, identity, outcome, evaluation.metrics, started, hooked)
    store.write_run(row, curve, evaluation.tables)
    return row
