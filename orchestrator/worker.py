"""What a worker does with a pack: train its runs in lockstep from one shared activation stream, evaluate
each, and write each run's results the moment it is finished.

The function is plain Python (no Ray in here): the scheduler runs it as a Ray task, tests call it directly.
A retried pack starts again from the top: finished runs are skipped (their rows exist), interrupted runs
resume from their checkpoints, and a run another process holds the lock of is left to that process.

A run trained by several processes (resources.shards / replicas) is not packed: `train_rank` is one process
of its group (orchestrator/multiprocess_run.py starts them); rank 0 reports progress and writes the run's results.
"""
from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime

import torch

from orchestrator.plan import RunPlan
from orchestrator.record import EvalInputs, Identity, Outcome, Splicer, now_utc, record, runs_row, splicer_of
from orchestrator.spec import SweepSpec, parse_spec
from orchestrator.store import ResultsStore
from sae_core.activation_data import ActivationData
from sae_core.errors import SAEScalingError
from sae_core.evaluation.downstream import null_downstream
from sae_core.parallel.launch import init_distributed
from sae_core.parallel.mesh import build_mesh
from sae_core.sources.base import ActivationSource
from sae_core.tracking import Trackers
from sae_core.trainer import RunResult, Trainer, resolve_device

PROGRESS_EVERY_S = 2.0
LOCK_WAIT_S = 10.0  # how long a pack waits for a run's lock before leaving the run to its holder


class SharedStream(ActivationSource):
    """One activation source read by several trainers stepping in lockstep: each batch is produced once
    (one model forward or cache read for the whole pack) and handed to every trainer."""

    def __init__(self, source: ActivationSource, keep: int = 4):
        self.source, self.keep, self.d_in = source, keep, source.d_in
        # ActivationSource's defaults would shadow __getattr__: a multi-layer source's own are passed on
        self.vectors_per_token = source.vectors_per_token
        self.produced = 0  # batches actually read from the source
        self._recent: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        key = (step, batch_size)
        if key not in self._recent:
            self._recent[key] = self.source.train_batch(step, batch_size)
            self.produced += 1
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return self._recent[key]

    def eval_set(self) -> torch.Tensor:
        return self.source.eval_set()

    def sample(self, n: int) -> torch.Tensor:
        return self.train_batch(0, n)  # the same key in every trainer of the pack

    def eval_layer_ids(self) -> torch.Tensor | None:
        return self.source.eval_layer_ids()

    def __getattr__(self, name):  # the rest of the source's attributes
        return getattr(self.source, name)


@dataclass
class ActiveRun:
    plan: RunPlan
    trainer: Trainer
    steps: object  # the trainer's run_steps generator
    started: datetime
    tokens: int = 0
    trackers: Trackers | None = None
    rung: tuple[int, int] | None = None  # a searched run's (rung, tokens to stop at): orchestrator/search.py


def _start(spec: SweepSpec, store: ResultsStore, plan: RunPlan, trainer: Trainer, track: bool = True,
           rung: tuple[int, int] | None = None) -> ActiveRun:
    """A run begun: its step generator, and its trackers (W&B, TensorBoard) if the sweep has any."""
    trackers = None
    if track and spec.trackers.any:
        trackers = Trackers(spec.trackers, store.dir, plan.run_id, spec.name,
                            {"sae": plan.sae, "train": plan.train, "axes": plan.axes})
    steps = trainer.run_steps(on_curve=trackers.log if trackers else None, until_tokens=rung[1] if rung else None)
    return ActiveRun(plan, trainer, steps, now_utc(), trackers=trackers, rung=rung)


def run_row(spec: SweepSpec, plan: RunPlan, result: RunResult | None, evaluation: dict, started: datetime,
            error: str | None = None, hooked: list[int] | None = None) -> dict:
    """The runs-table row of a planned run (orchestrator/record.py); result None: it failed (`error` says how)."""
    return runs_row(spec, Identity.of_plan(plan), Outcome.of_training(result, error), evaluation, started, hooked)


def _setup(spec_data: dict, results_root: str, cache_root: str | None, threads: int | None):
    """cache_root: the driver's cache root (activations and token rows), which it has already filled."""
    if cache_root:
        os.environ["SAE_SCALING_CACHE"] = cache_root
    if threads:
        torch.set_num_threads(threads)  # a reused Ray worker keeps the thread count of its first task
    spec = parse_spec(spec_data)
    return spec, ResultsStore(results_root, spec.name)


def _trainer(spec: SweepSpec, data: ActivationData, stream: SharedStream, store: ResultsStore, plan: RunPlan,
             **kw) -> Trainer:
    hook = data.hook_meta()
    if hook is not None and plan.layer is not None:
        hook = {**hook, "layers": [plan.layer]}
    return Trainer(plan.sae, plan.train, stream, store.sae_dir(plan.run_id),
                   meta={"hook": hook, "run_id": plan.run_id, "sweep": spec.name, "axes": plan.axes}, **kw)


def train_pack(spec_data: dict, runs: list[dict], results_root: str, cache_root: str | None = None,
               threads: int | None = None, rungs: dict[str, tuple[int, int]] | None = None) -> dict[str, str]:
    """Train and evaluate a pack; returns run_id -> status for the runs this call finished. rungs: a search's
    round, run_id -> (rung, tokens): those runs stop there (status stopped) and record the rung."""
    rungs = rungs or {}
    spec, store = _setup(spec_data, results_root, cache_root, threads)
    plans = [RunPlan(**r) for r in runs]
    finished: dict[str, str] = {}
    with ExitStack() as stack:
        done = store.ended([p.run_id for p in plans], rungs)
        owned = [p for p in plans if p.run_id not in done and stack.enter_context(store.lock(p.run_id, LOCK_WAIT_S))]
        done = store.ended([p.run_id for p in owned], rungs)  # finished while we waited for its lock
        owned = [p for p in owned if p.run_id not in done]
        if not owned:
            return finished
        data = ActivationData(spec.model, spec.hook, spec.data).prepare()
        layer = owned[0].layer
        stream = SharedStream(data.source(layer, seed=spec.data_seed))
        active = []
        for plan in owned:
            trainer = _trainer(spec, data, stream, store, plan)
            active.append(_start(spec, store, plan, trainer, rung=rungs.get(plan.run_id)))
        results: list[tuple[ActiveRun, RunResult | None, str | None]] = []
        splicer = splicer_of(spec, data)
        last_report = 0.0
        while active:
            for run in list(active):
                try:
                    run.tokens = next(run.steps)
                except StopIteration as stop:
                    results.append((run, stop.value, None))
                    active.remove(run)
                except Exception as err:  # a bug or out-of-memory in one run must not take the pack down with it
                    # bad input met mid-run (nan in a batch): its message says all, a traceback would bury it
                    error = str(err) if isinstance(err, SAEScalingError) else traceback.format_exc(limit=-3)
                    results.append((run, None, error))
                    active.remove(run)
            if time.time() - last_report > PROGRESS_EVERY_S or not active:
                for run in active:
                    store.write_progress(run.plan.run_id, run.tokens, run.plan.train["train_tokens"], run.started)
                last_report = time.time()
            for run, result, error in results:
                finished[run.plan.run_id] = finish_run(spec, data, stream, run, result, error, store, layer, splicer)
            results.clear()
    return finished


def train_rank(spec_data: dict, run: dict, results_root: str, cache_root: str | None, threads: int | None,
               rank: int, shards: int, replicas: int, address: str, port: int,
               rung: tuple[int, int] | None = None) -> dict[str, str]:
    """One process of a run trained by shards x replicas processes; the caller holds the run's lock.
    Returns run_id -> status from rank 0, {} from the others. rung: a search's (rung, tokens) to stop at."""
    spec, store = _setup(spec_data, results_root, cache_root, threads)
    plan = RunPlan(**run)
    init_distributed(rank, shards * replicas, address, port, resolve_device(plan.train["device"]))
    try:
        mesh = build_mesh(shards, replicas)
        data = ActivationData(spec.model, spec.hook, spec.data).prepare()
        stream = SharedStream(data.source(plan.layer, seed=spec.data_seed))
        trainer = _trainer(spec, data, stream, store, plan, mesh=mesh)
        active = _start(spec, store, plan, trainer, track=mesh.leader, rung=rung)
        last_report = 0.0
        while True:
            try:
                active.tokens = next(active.steps)
            except StopIteration as stop:
                result = stop.value
                break
            if mesh.leader and time.time() - last_report > PROGRESS_EVERY_S:
                store.write_progress(plan.run_id, active.tokens, plan.train["train_tokens"], active.started)
                last_report = time.time()
        if not mesh.leader:
            return {}
        status = finish_run(spec, data, stream, active, result, None, store, plan.layer, splicer_of(spec, data))
        return {plan.run_id: status}
    finally:
        torch.distributed.destroy_process_group()


def finish_run(spec: SweepSpec, data: ActivationData, stream: SharedStream, run: ActiveRun, result: RunResult | None,
               error: str | None, store: ResultsStore, layer: int | None, splicer: Splicer) -> str:
    """Record a run that ended: evaluated if it trained to the end, its row and curve otherwise."""
    identity, outcome = Identity.of_plan(run.plan), Outcome.of_training(result, error)
    if outcome.status == "ok":
        row = record(spec, store, identity, result.sae, EvalInputs.of(spec, data, stream, layer, splicer), outcome,
                     run.started, data.layers, result.curve)
    else:
        reason = ("run failed" if result is None else "stopped by the search" if result.status == "stopped"
                  else f"run {result.status}")
        row = runs_row(spec, identity, outcome, null_downstream(reason), run.started, data.layers)
        store.write_run(row, result.curve if result else [])
    if run.rung is not None and outcome.status in ("ok", "stopped"):  # the search's evidence, after the row
        store.add_rung(run.plan.run_id, {"rung": run.rung[0], "tokens": outcome.tokens, "nmse": outcome.metrics["nmse"]})
    if run.trackers is not None:
        run.trackers.finish({k: v for k, v in row.items() if k not in ("started_at", "finished_at")})
    return row["status"]
