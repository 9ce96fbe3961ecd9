"""From a validated sweep to its runs and packs.

A run is one SAE: its resolved SAE and trainer configs, the layer it reads, and `run_id`, a hash of
everything that determines its result (model, hook, data, the resolved configs, evaluation, data order, and
the content of the local inputs: activation files, text files, a model folder), so re-running a sweep finds
its finished runs, two grids that share a point share its run, and a run whose inputs were replaced at the
same path is a new run. Values are hashed resolved, not as spelt: `lr: auto` and the number it resolves to
are one run. `settings` is the same hash without the input contents, so a plan can tell "the inputs
changed" from "a new grid point" (pending_reason).

A pack is a set of runs that read the same activation stream (same data, layer, data order, batch size
and token budget): one worker trains them in lockstep from one stream, so the model's forward pass and the
cache reads happen once per batch for the whole pack.

`plan_sweep` does all of it for a sweep file, finding every error before any work or output; `dry_run`
prints the plan against what the store already holds.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.search import Candidate, cell_key, expected_flops
from orchestrator.spec import SPECIAL_AXES, SweepSpec, load_spec, sae_keys, train_keys
from orchestrator.status import last_line
from orchestrator.store import DONE, ResultsStore
from sae_core.activation_data import ActivationData
from sae_core.architectures import parse_sae_config
from sae_core.architectures.base import registry
from sae_core.checkpoint import has_checkpoint
from sae_core.errors import ConfigError, DataError, SAEScalingError
from sae_core.evaluation.probe_datasets import read_rows
from sae_core.fingerprint import paths_fingerprint
from sae_core.lm.loading import local_model_fingerprint
from sae_core.sources.files import expand_paths
from sae_core.tracking import check_installed
from sae_core.trainer import continuable, layout_problems, resolve_configs


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    arch: str
    layer: int | None  # None: every hooked layer (multi-layer SAE) or data without layers
    axes: dict  # this run's grid values (the axes that apply to its architecture)
    sae: dict  # resolved SAE config
    train: dict  # resolved trainer config
    stream: str  # runs with equal streams can share one activation stream
    settings: str = ""  # the run_id's hash without the input contents (pending_reason tells them apart)
    inputs: dict = field(default_factory=dict)  # label -> content digest of a local input (data_identity)
    model: str | None = None  # the subject model whose activations it reads (Sweep.models' key)
    # the run_id's hash without the budget (train_tokens) nor the evaluation settings, for a run whose training
    # is a prefix of the same run's with a larger budget (sae_core.trainer.continuable); "" otherwise
    lineage: str = ""

    def plan_entry(self) -> dict:
        """What plan.json keeps of the run."""
        return {"run_id": self.run_id, "arch": self.arch, "layer": self.layer, "axes": self.axes,
                "settings": self.settings, "inputs": self.inputs, "lineage": self.lineage,
                "budget": self.train["train_tokens"]}

    @property
    def n_latents(self) -> int:
        return self.sae["n_latents"]

    def memory_bytes(self) -> int:
        """Training memory estimate: fp32 weights, gradients and two Adam moments of both [n, d] matrices,
        plus a dense [batch, n] pre-activation and its gradient."""
        n, d, batch = self.n_latents, self.sae["d_in"], self.train["batch_size"]
        return 4 * (4 * 2 * n * d + 2 * batch * n)

    def flops(self) -> float:
        """Estimated training FLOPs: train_tokens x the family's FLOPs per vector (docs/scaling-laws.md,
        "Compute accounting")."""
        cfg = parse_sae_config(self.sae)
        return self.train["train_tokens"] * registry()[self.arch].flops_per_vector(cfg)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_digests(spec: SweepSpec) -> dict[str, str]:
    """label -> content digest (sae_core.fingerprint) of each local input the sweep reads: the activation
    files, the text files or local dataset, the model folder (the embedded model's too), the probe task
    files. Synthetic data, a hub dataset, the embedded corpus and a hub model contribute nothing: their
    settings are all there is on this side (the spec names them)."""
    inputs = {}
    if spec.data.activations is not None:
        inputs["data.activations"] = paths_fingerprint(expand_paths(spec.data.activations))
    if spec.data.text is not None and (text := spec.data.text.local_fingerprint()) is not None:
        inputs["data.text"] = text
    if spec.data.has_model and (model := local_model_fingerprint(spec.model)) is not None:
        inputs["model"] = model
    for task in spec.eval.probe_tasks if spec.eval.probe else ():
        if task.path is not None:
            inputs[f"eval.probe_tasks[{task.name}]"] = paths_fingerprint([Path(task.path).expanduser()])
    return inputs


def data_identity(spec: SweepSpec, inputs: dict[str, str] | None = None) -> dict:
    """What determines the training vectors, without run-time knobs (device, batch_rows, cache path):
    the settings, and under `inputs` the local inputs' content digests (input_digests; computed unless
    given)."""
    data = spec.data.model_dump(mode="json", exclude={"device", "batch_rows"})
    return {"model": spec.model, "site": spec.hook.site if spec.data.has_model else None, "data": data,
            "data_seed": spec.data_seed, "inputs": input_digests(spec) if inputs is None else inputs}


def _grid_points(spec: SweepSpec):
    """(axis values, overrides) per grid point: the product of the axes, each zip group counting as one axis.
    An architecture's list-valued overrides are its own axes: its points drop the grid's value of such a key
    and take each of the list's values in turn (the copies this makes of a point are removed by run_id in
    plan_runs); its scalar overrides are the same at every point."""
    zipped = {k for group in spec.zip for k in group}
    units = [[dict(zip(group, values)) for values in zip(*(spec.grid[k] for k in group))] for group in spec.zip]
    units += [[{key: v} for v in values] for key, values in spec.grid.items() if key not in zipped]
    for combo in itertools.product(*units):
        point = {k: v for part in combo for k, v in part.items()}
        override = spec.overrides.get(point["arch"], {})
        lists = {k: v for k, v in override.items() if isinstance(v, list)}
        if not lists:
            yield point, override
            continue
        scalars = {k: v for k, v in override.items() if k not in lists}
        base = {k: v for k, v in point.items() if k not in lists}
        for values in itertools.product(*lists.values()):
            yield base, {**scalars, **dict(zip(lists, values))}


def _configs(spec: SweepSpec, sae: dict, train: dict, parts: int, source: str, where: str):
    """The resolved SAE and trainer configs of a grid point's SAE holding 1/parts of its latents and vectors,
    what its run_id hashes of the trainer config, and what its activation stream depends on."""
    if parts > 1:
        sae = {**sae, "n_latents": max(1, round(sae["n_latents"] / parts))}
        train = {**train, "train_tokens": -(-train["train_tokens"] // parts)}
        where = f"{where}, its per-layer SAEs (1/{parts} of the latents and vectors)"
    try:
        sae_cfg, train_cfg = resolve_configs(sae, train, source)
    except ConfigError as err:
        raise ConfigError(f"{err} (at {where})") from None
    problems = layout_problems(sae_cfg, train_cfg, *spec.resources.layout)
    if problems:
        shards, replicas = spec.resources.layout
        raise ConfigError("\n".join(f"{source}: {p} (resources: shards {shards}, replicas {replicas}; at {where})"
                                     for p in problems))
    train_dump = train_cfg.model_dump(mode="json")
    # hashed resolved: `lr: auto` and the number it resolves to train the same SAE
    resolved = {**{k: v for k, v in train_dump.items() if k not in ("device", "eval_batch_size", "checkpoint_every_tokens")},
                "lr": train_cfg.resolved_lr(sae_cfg.n_latents)}
    return sae_cfg, train_cfg, resolved, {"batch_size": train_cfg.batch_size, "train_tokens": train_cfg.train_tokens}


def plan_runs(spec: SweepSpec, d_in: int, layers: list[int | None], source: str = "sweep",
              model_axis: bool = False) -> list[RunPlan]:
    """Every run of a single-model sweep (SweepSpec.per_model), in grid order, duplicates (axes that do not
    apply) removed. model_axis: the sweep lists several models, so `model` is one of the runs' axes."""
    runs: dict[str, RunPlan] = {}
    identity = data_identity(spec)
    inputs = identity.pop("inputs")
    for point, override in _grid_points(spec):
        arch = point["arch"]
        own = sae_keys(arch)
        axes = {**({"model": spec.model} if model_axis else {}),
                **{k: v for k, v in point.items() if k in SPECIAL_AXES or k in own or k in train_keys()}}
        values = {**axes, **override}
        sized = override if {"n_latents", "expansion_factor"} & set(override) else axes  # an override's size wins
        n = sized.get("n_latents") or round(sized["expansion_factor"] * d_in)
        sae = {"arch": arch, "d_in": d_in, "n_latents": n, **{k: v for k, v in spec.sae.items() if k in own},
               **{k: v for k, v in values.items() if k in own}}
        where = f"grid point {json.dumps(axes, default=str)}" + (
            f" with overrides.{arch} {json.dumps(override, default=str)}" if override else "")
        # data.train_tokens is the pool of training vectors and the default budget; overrides.<arch>.
        # train_tokens a family's own budget (its source cycles the pool in reshuffled epochs if larger)
        train = {**spec.train, **{k: v for k, v in values.items() if k in train_keys()},
                 "train_tokens": values.get("train_tokens", spec.data.train_tokens),
                 **({"lr": values["lr"]} if "lr" in values else {}), "seed": values.get("seed", 0)}
        # hook.multi_layer `both`: the grid point sizes the multi-layer SAE; each of the L per-layer SAEs beside
        # it gets 1/L of its latents and of its training vectors, so the two compare at equal total latents on
        # the same vectors (each position's vector at each layer seen as often), as Lawson et al. 2024 compare
        # them; the per-layer set costs 1/L of the multi-layer SAE's FLOPs
        n_layers = sum(layer is not None for layer in layers)
        share = n_layers if None in layers and n_layers else 1
        built: dict[int, tuple] = {}
        for layer in layers:
            parts = 1 if layer is None else share
            if parts not in built:
                built[parts] = _configs(spec, sae, train, parts, source, where)
            sae_cfg, train_cfg, resolved, stream = built[parts]
            stream = _hash({**identity, "inputs": inputs, **stream})
            ident = {**identity, "layer": layer, "layers": spec.hook.layers if layer is None else None,
                     "sae": sae_cfg.model_dump(mode="json"), "train": resolved,
                     "eval": spec.eval.model_dump(mode="json")}
            settings = _hash(ident)
            # without local inputs the id is the settings' hash: such sweeps keep the ids they had before
            # inputs were hashed
            run_id = _hash({**ident, "inputs": inputs}) if inputs else settings
            lineage = (_hash({**ident, "inputs": inputs, "eval": None,
                              "train": {k: v for k, v in resolved.items() if k != "train_tokens"}})
                       if continuable(sae_cfg, train_cfg) else "")
            runs.setdefault(run_id, RunPlan(run_id, arch, layer, {**axes, **override}, sae_cfg.model_dump(mode="json"),
                                            train_cfg.model_dump(mode="json"), f"{stream}-{layer}", settings, inputs,
                                            spec.model, lineage))
    return list(runs.values())


def continuations(runs: list[RunPlan], previous: list[dict], store: ResultsStore) -> dict[str, str]:
    """run_id -> the earlier run it continues: for a run not started (no row, no checkpoint) whose budget was
    raised, the planned-before run of the same lineage and the largest smaller budget that left a checkpoint.
    Its training is the new run's first tokens (RunPlan.lineage), so the new run starts from that checkpoint."""
    out = {}
    for run in runs:
        if not run.lineage or store.path("runs", run.run_id).is_file() or has_checkpoint(store.sae_dir(run.run_id)):
            continue
        earlier = [e for e in previous if e.get("lineage") == run.lineage and e.get("run_id") != run.run_id
                   and isinstance(e.get("budget"), int) and e["budget"] < run.train["train_tokens"]
                   and has_checkpoint(store.sae_dir(e["run_id"]))]
        if earlier:
            out[run.run_id] = max(earlier, key=lambda e: e["budget"])["run_id"]
    return out


def pending_reason(run: RunPlan, previous: list[dict]) -> str:
    """Why a run that is not done has not been trained, from the previous plan.json's entries (possibly
    none, or written before `settings` and `inputs` were kept): an earlier run with the same settings but
    other input contents -> "inputs changed since run <its id>: <the labels that differ>"; the same run
    planned before -> "planned before, not finished"; otherwise "new grid point"."""
    for entry in previous:
        if entry.get("run_id") == run.run_id:
            return "planned before, not finished"
    for entry in previous:
        if run.lineage and entry.get("lineage") == run.lineage and entry.get("budget", 0) < run.train["train_tokens"]:
            return f"budget raised from run {entry.get('run_id')}'s {entry.get('budget'):,} tokens"
    for entry in previous:
        old = entry.get("inputs")
        if entry.get("settings") != run.settings or not isinstance(old, dict) or old == run.inputs:
            continue
        changed = sorted(k for k in set(old) | set(run.inputs) if old.get(k) != run.inputs.get(k))
        return f"inputs changed since run {entry.get('run_id')}: {', '.join(changed)}"
    return "new grid point"


def pack_runs(runs: list[RunPlan], pack_size: int, memory_bytes: float | None = None) -> list[list[RunPlan]]:
    """Runs grouped by stream, largest SAEs first (they take longest), in packs of at most pack_size runs and,
    when the worker's memory is given, at most that much estimated training memory (a run larger than the
    budget alone still gets its own pack)."""
    by_stream: dict[str, list[RunPlan]] = {}
    for run in sorted(runs, key=lambda r: -r.n_latents):
        by_stream.setdefault(run.stream, []).append(run)
    packs = []
    for group in by_stream.values():
        pack, used = [], 0
        for run in group:
            need = run.memory_bytes()
            if pack and (len(pack) == pack_size or (memory_bytes is not None and used + need > memory_bytes)):
                packs.append(pack)
                pack, used = [], 0
            pack.append(run)
            used += need
        packs.append(pack)
    return packs


def search_cells(runs: list[RunPlan], axis: str) -> dict[str, list[Candidate]]:
    """The runs grouped into a search's cells: those that differ only in the searched axis."""
    cells: dict[str, list[Candidate]] = {}
    for r in runs:
        budget = r.train["train_tokens"]
        cells.setdefault(cell_key(r.axes, r.layer, r.model, axis), []).append(
            Candidate(r.run_id, budget, r.train["batch_size"], r.flops() / budget))
    return cells


# --- a sweep planned against its data and its store: what `run` trains and `--dry-run` shows ----------------
@dataclass
class Sweep:
    spec: SweepSpec
    path: str  # the sweep file, for messages
    text: str  # the YAML as given
    # per subject model (RunPlan.model): its single-model sweep and activation data (SweepSpec.per_model)
    models: dict[str | None, tuple[SweepSpec, ActivationData]]
    runs: list[RunPlan]
    store: ResultsStore

    def of(self, run: RunPlan) -> tuple[SweepSpec, ActivationData]:
        """The single-model sweep and the data a run trains on."""
        return self.models[run.model]


def plan_sweep(path: str | Path, results: str | Path = "results") -> Sweep:
    """Everything that can be wrong with the sweep is found here, before any work or output."""
    spec = load_spec(path)
    try:
        check_installed(spec.trackers)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if spec.cache_root:
        os.environ["SAE_SCALING_CACHE"] = str(Path(spec.cache_root).expanduser().resolve())
    for task in spec.eval.probe_tasks if spec.eval.probe else ():  # read now: a bad file fails before training
        try:
            read_rows(task)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
    models, runs = {}, []
    for one in spec.per_model():
        try:
            data = ActivationData(one.model, one.hook, one.data).prepare(build=False)
        except SAEScalingError as err:
            where = f" (model {one.model})" if one is not spec else ""
            raise type(err)(f"{path}: {err}{where}") from None
        models[one.model] = (one, data)
        runs += plan_runs(one, data.d_in, data.run_layers(), source=str(path), model_axis=one is not spec)
    return Sweep(spec, str(path), Path(path).read_text(), models, runs, ResultsStore(results, spec.name))


def _fmt_flops(x: float) -> str:
    return f"{x:.2e}"


def previous_plan(store: ResultsStore) -> list[dict]:
    """The plan the sweep's last `run` wrote; none if it is unreadable, since the next `run` rewrites it."""
    try:
        return store.plan()
    except DataError:
        return []


def run_states(sweep: Sweep) -> dict[str, str]:
    """run_id -> done, running, stopped, failed (with its error), broken (its unreadable files) or pending
    (and why)."""
    store = sweep.store
    states = store.states(r.run_id for r in sweep.runs)
    previous = previous_plan(store)
    out = {}
    for run in sweep.runs:
        s = states[run.run_id]
        if s.status == "broken":
            out[run.run_id] = "broken: " + ", ".join(str(p.relative_to(store.dir)) for p, _ in s.problems)
        elif s.status in DONE:
            out[run.run_id] = "done"
        elif s.status == "running":
            out[run.run_id] = "running"
        elif s.status == "stopped":
            out[run.run_id] = f"stopped at {s.row['tokens']:,} tokens"
        elif s.row is not None:
            out[run.run_id] = f"{s.status}: " + last_line(s.row.get("error"))
        else:
            out[run.run_id] = "pending: " + pending_reason(run, previous)
    return out


def dry_run(sweep: Sweep, echo: Callable[[str], None] = print) -> None:
    states = run_states(sweep)
    ids = [r.run_id for r in sweep.runs]
    several = len(sweep.models) > 1
    width = max((len(str(m)) for m in sweep.models), default=5) if several else 0
    header = f"{'run_id':16}  " + (f"{'model':{width}} " if several else "") + f"{'arch':10} {'layer':>5} {'n_latents':>9} {'k':>5} {'l1_coeff':>9} {'lr':>8} " \
             f"{'seed':>4} {'tokens':>12} {'est. FLOPs':>10}  state"
    echo(header)
    total_flops = todo_flops = 0.0
    for run in sweep.runs:
        flops = run.flops()
        total_flops += flops
        state = states[run.run_id]
        todo_flops += 0 if state == "done" else flops
        layer = "all" if run.layer is None and sweep.spec.data.has_model else ("-" if run.layer is None else run.layer)
        lr = run.train["lr"]
        model = f"{run.model!s:{width}} " if several else ""
        echo(f"{run.run_id:16}  {model}{run.arch:10} {layer!s:>5} {run.n_latents:>9} {run.sae.get('k', '-')!s:>5} "
             f"{run.sae.get('l1_coeff', '-')!s:>9} {lr if isinstance(lr, str) else f'{lr:.2e}':>8} "
             f"{run.train['seed']:>4} {run.train['train_tokens']:>12,} {_fmt_flops(flops):>10}  {state}")
    done = {rid for rid, state in states.items() if state == "done"}
    shards, replicas = sweep.spec.resources.layout
    if shards * replicas > 1:
        units = f"{len(sweep.runs) - len(done)} runs to train, each on {shards} shards x {replicas} replicas"
    else:
        packs = pack_runs([r for r in sweep.runs if r.run_id not in done], sweep.spec.pack_size)
        units = f"{len(packs)} packs to train"
    echo(f"{len(sweep.runs)} runs ({len(done)} done), {units}; SAE training compute "
         f"{_fmt_flops(total_flops)} FLOPs in all, {_fmt_flops(todo_flops)} to do (formula: "
         "docs/scaling-laws.md, Compute accounting)")
    if sweep.spec.search is not None:
        cfg = sweep.spec.search
        cells = search_cells(sweep.runs, cfg.axis)
        searched = expected_flops(cells, cfg)
        sizes = sorted({len(c) for c in cells.values()})
        echo(f"search over {cfg.axis} in {len(cells)} cells of {', '.join(map(str, sizes))} candidates (eta {cfg.eta:g}, "
             f"rungs at {', '.join(f'{f:.3g}' for f in cfg.fractions(max(sizes)))} of the budget, rank "
             f"{cfg.rank}): expected {_fmt_flops(searched)} FLOPs, {searched / max(total_flops, 1e-300):.0%} of the "
             f"full grid's {_fmt_flops(total_flops)}; spent so far {_fmt_flops(sweep.store.flops_spent(ids))}")
    flops = [data.activation_flops() for _, data in sweep.models.values()]
    if None not in flops:
        act = sum(flops)
        where = ("once, into the cache" if sweep.spec.data.cache
                 else "per pack: activations are computed on the fly by every pack")
        echo(f"activation generation: {_fmt_flops(act)} FLOPs {where}"
             + (f" ({len(flops)} models)" if len(flops) > 1 else ""))
