"""Running a planned sweep on Ray (planning and the dry run: orchestrator/plan.py): build the activation
cache once, then train the packs as Ray tasks (or, for runs trained by several processes, one group per run:
orchestrator/multiprocess_run.py).

One plain Ray task per pack (not Tune: ~0.1 s per task against ~2.5 s per trial here, and the results
are ours to lay out), `max_retries` = the spec's retries so a dead worker or node re-runs the pack from its
checkpoints, application errors not retried (they are bugs or bad data and would fail again). The driver
polls the store for progress, writes a failed row for every run of a pack that failed for good, and on
Ctrl-C cancels what is running: the next `run` resumes from the checkpoints.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.multiprocess_run import process_options, train_group
from orchestrator.plan import RunPlan, Sweep, continuations, pack_runs, plan_sweep, previous_plan, search_cells
from orchestrator.search import Round, cell_key, plan_round
from orchestrator.spec import SweepSpec
from orchestrator.status import summary
from orchestrator.store import ENDED
from orchestrator.worker import now_utc, run_row, train_pack
from sae_core.cache_dir import cache_root as default_cache_root
from sae_core.checkpoint import adopt_checkpoint
from sae_core.errors import ConfigError
from sae_core.evaluation.downstream import null_downstream
from sae_core.trainer import resolve_configs, train_fingerprint

POLL_S = 1.0


# --- Ray -------------------------------------------------------------------------------------------------
def _check_reachable(address: str) -> None:
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        if not parsed.hostname:
            raise OSError("no host in the address")
        socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: unreachable ({err.strerror or err}); give the head node's "
                          "host:port (e.g. 10.0.0.1:6379), or leave it out for a local Ray") from None


def connect(address: str | None):
    """Attach to a running Ray (given, or the job's RAY_ADDRESS), else start an embedded local one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:  # embedded: loopback only, no token file in the user's home
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return ray
    if address in (None, "local"):
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def process_resources(ray, spec: SweepSpec) -> dict:
    """Ray resources of one training process, checked against the live nodes: a demand no node can meet (or a
    group of processes the whole cluster cannot hold at once) is an error now, not a task pending forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    res = spec.resources
    shards, replicas = res.layout
    need = {"CPU": res.cpus, "GPU": res.per_process_gpus(any(n.get("GPU", 0) >= 1 for n in nodes)), **res.custom}
    if res.memory_gb:
        need["memory"] = res.memory_gb * 2**30
    need = {k: v for k, v in need.items() if v}
    holds = [min(int(n.get(k, 0) / v + 1e-9) for k, v in need.items()) for n in nodes]
    offers = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in need) or "nothing" for n in nodes)
    if not any(holds):
        raise ConfigError(f"resources: a run needs {', '.join(f'{k} {v:g}' for k, v in need.items())}"
                          f"{' per process' if shards * replicas > 1 else ''}, which no node of the cluster offers "
                          f"(nodes: {offers}); lower resources.* (gpus: auto runs on CPU where there is no GPU)")
    if sum(holds) < shards * replicas:
        raise ConfigError(f"resources: a run needs shards x replicas = {shards * replicas} processes of "
                          f"{', '.join(f'{k} {v:g}' for k, v in need.items())} at once; the cluster holds "
                          f"{sum(holds)} (nodes: {offers}); lower resources.shards, replicas or the per-process "
                          "resources")
    return need


def check_memory(ray, sweep: Sweep, runs: list[RunPlan]) -> None:
    """A run whose estimated training memory (RunPlan.memory_bytes, split over its shards) exceeds every live
    node's memory would sit at 0 tokens until the node swaps or kills it: refused now, like a GPU demand no
    node meets. Host memory bounds a GPU run too (its state passes through it at start and at checkpoints)."""
    capacity = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    shards = sweep.spec.resources.layout[0]
    too_big = [r for r in runs if capacity and r.memory_bytes() / shards > capacity]
    if too_big:
        run = max(too_big, key=RunPlan.memory_bytes)
        raise ConfigError(
            f"{sweep.path}: {len(too_big)} runs need more memory than any node has, e.g. run {run.run_id} "
            f"({run.arch}, n_latents {run.n_latents}, train.batch_size {run.train['batch_size']}): about "
            f"{run.memory_bytes() / shards / 2**30:,.1f} GiB per process (fp32 weights, gradients and Adam moments, "
            f"a dense [batch, n_latents] pre-activation), the largest node offers {capacity / 2**30:,.1f} GiB; "
            "lower n_latents or train.batch_size, or split the latents with resources.shards")


class Progress:
    """One line: runs done / running / failed / pending, tokens per second, ETA."""

    def __init__(self, sweep: Sweep, runs: list[RunPlan], echo: Callable[[str], None],
                 rungs: dict[str, tuple[int, int]] | None = None):
        self.sweep, self.echo = sweep, echo
        rungs = rungs or {}
        self.total = {r.run_id: rungs[r.run_id][1] if r.run_id in rungs else r.train["train_tokens"] for r in runs}
        self.t0, self.last = time.time(), 0.0
        self.tty = sys.stdout.isatty()
        self.resumed = self._tokens({}, sweep.store.progress())  # trained before this run: not in the rate

    def _tokens(self, statuses: dict[str, str], prog: dict[str, dict]) -> int:
        return sum(statuses.get(r) in ENDED and self.total[r]
                   or min(prog.get(r, {}).get("tokens", 0), self.total[r]) for r in self.total)

    def show(self, statuses: dict[str, str], running: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < (1 if self.tty else 15):
            return
        self.last = now
        tokens = self._tokens(statuses, self.sweep.store.progress())
        rate = max(tokens - self.resumed, 0) / max(now - self.t0, 1e-9)
        left = sum(self.total.values()) - tokens
        eta = f"{left / rate:,.0f} s" if rate > 0 else "?"
        done = sum(s in ENDED for s in statuses.values())
        failed = sum(s == "failed" for s in statuses.values())
        line = (f"runs: {done} done, {running} running, {failed} failed, {len(self.total) - done - failed - running} "
                f"pending | {rate:,.0f} tokens/s | ETA {eta}")
        if self.tty:
            print("\r" + line, end="\n" if force else "", flush=True)
        else:
            self.echo(line)


def run_sweep(path: str | Path, results: str | Path = "results", address: str | None = None,
              max_parallel: int | None = None, echo: Callable[[str], None] = print) -> int:
    """Train every run of the sweep not yet done (a search: round after round, orchestrator/search.py);
    returns the exit code (0: all ok, 1: some failed)."""
    sweep = plan_sweep(path, results)
    store = sweep.store
    ids = [r.run_id for r in sweep.runs]
    broken = store.broken(ids)
    done = store.done(rid for rid in ids if rid not in broken)
    search = sweep.spec.search
    todo = [r for r in sweep.runs if r.run_id not in done]
    if search is not None and not broken:  # what the search still has to train (broken runs: all of it, below)
        todo = [r for r in todo if r.run_id in _search_round(sweep, store).targets]
    if todo:  # checked before anything is written
        for _, data in sweep.models.values():
            data.check_finite(echo)
        ray = connect(address)
        need = process_resources(ray, sweep.spec)
        check_memory(ray, sweep, todo)
    for line in store.set_aside(broken):
        echo(line)
    for line in (_continue_runs(sweep, todo) if search is None else _carry_searches(sweep)):
        echo(line)
    store.save_spec(sweep.text)
    store.save_plan([r.plan_entry() for r in sweep.runs])
    echo(f"sweep {sweep.spec.name}: {len(sweep.runs)} runs, {len(done)} already done -> {store.dir}")
    if not todo:
        return 0
    for model, (_, data) in sweep.models.items():  # builds each activation cache once, here, for every worker
        if len(sweep.models) > 1:
            echo(f"model {model}:")
        data.prepare(echo)
    dashboard = getattr(ray.get_runtime_context(), "dashboard_url", None) or ""
    if dashboard:
        echo(f"Ray dashboard: http://{dashboard}")
    try:
        if search is None:
            statuses = _train(ray, sweep, todo, need, max_parallel, echo)
        else:
            statuses = {}
            while (step := _search_round(sweep, store)).targets:
                runs = [r for r in sweep.runs if r.run_id in step.targets]
                rungs = sorted({rung for rung, _ in step.targets.values()})
                echo(f"search: {len(runs)} runs to rung{'s' * (len(rungs) > 1)} {', '.join(map(str, rungs))} "
                     f"({len(step.stopped)} stopped so far)")
                statuses.update(_train(ray, sweep, runs, need, max_parallel, echo, step.targets))
                if any(statuses.get(r.run_id) not in (*ENDED, None) for r in runs):
                    break  # a failed run: its cell cannot be ranked; the next `run` retries it
                _wait_for_holders(store, [r.run_id for r in runs if r.run_id not in statuses], echo)
    except KeyboardInterrupt:
        echo("\nstopped: finished runs are saved; `sae-scaling run` again resumes the rest from their checkpoints")
        return 130
    skipped = [r.run_id for r in todo if not store.path("runs", r.run_id).is_file()]
    if skipped:
        echo(f"{len(skipped)} runs were held by another process (their lock); `sae-scaling status` shows them")
    summary(store, echo)
    if search is not None:
        final = _search_round(sweep, store)
        _search_summary(sweep, store, final, echo)
        return 0 if not final.targets else 1
    return 0 if store.done(ids) >= {r.run_id for r in todo} - set(skipped) else 1


def _continue_runs(sweep: Sweep, todo: list[RunPlan]) -> list[str]:
    """Runs whose budget was raised start from the checkpoint of the shorter run they extend
    (plan.continuations); done here, before plan.json forgets the shorter runs."""
    store = sweep.store
    lines = []
    for rid, earlier in continuations(todo, previous_plan(store), store).items():
        run = next(r for r in todo if r.run_id == rid)
        tokens = _adopt(store, earlier, run)
        lines.append(f"run {rid} continues run {earlier} from its checkpoint at {tokens:,} tokens (budget raised to "
                     f"{run.train['train_tokens']:,})")
    return lines


def _adopt(store, earlier: str, run: RunPlan) -> int:
    fingerprint = train_fingerprint(*resolve_configs(run.sae, run.train))
    return adopt_checkpoint(store.sae_dir(earlier), store.sae_dir(run.run_id), fingerprint)


def _carry_searches(sweep: Sweep) -> list[str]:
    """A search that finished, whose budget was then raised (over the same data): each candidate takes its
    shorter run's row (status stopped), curve and rung records, exactly its own up to there (a winner its
    checkpoint too), and the cell remembers its earlier budget (store.search_history): one more rung, past
    which only the winners continue. They train on to the new budget; the others stay stopped."""
    store, cfg = sweep.store, sweep.spec.search
    previous = previous_plan(store)
    entries = {e["run_id"]: e for e in previous}
    carried = continuations(sweep.runs, previous, store)
    history = store.search_history()
    by_id = {r.run_id: r for r in sweep.runs}
    lines = []
    for key, cands in search_cells(sweep.runs, cfg.axis).items():
        olds = {c.run_id: carried.get(c.run_id) for c in cands}
        rows = store.rows_of(o for o in olds.values() if o)
        if None in olds.values() or len(rows) < len(olds) or not any(r["status"] == "ok" for r in rows.values()):
            continue  # not every candidate has a shorter run, or their search did not finish: a search anew
        for new, old in olds.items():
            row = rows[old]
            if row["status"] == "ok":  # a winner goes on from its checkpoint; the others stay where they stopped
                _adopt(store, old, by_id[new])
            config = json.loads(row["config_json"])
            config["train"]["train_tokens"] = by_id[new].train["train_tokens"]
            store.write_run({**row, "run_id": new, "status": "stopped", "config_json": json.dumps(config)},
                            store.curve(old))
            for rung, rec in sorted(store.rungs([old]).get(old, {}).items()):
                store.add_rung(new, {"rung": rung, "tokens": rec["tokens"], "nmse": rec["nmse"]})
        old = entries[next(iter(olds.values()))]  # the shorter runs' cell and budget
        old_budget = old.get("budget")
        old_key = cell_key(old.get("axes", {}), old.get("layer"), by_id[cands[0].run_id].model, cfg.axis)
        history[key] = history.get(old_key, []) + [old_budget]
        winners = [new for new, old in olds.items() if rows[old]["status"] == "ok"]
        lines.append(f"search: budget raised from {old_budget:,}: {len(winners)} winner(s) of {len(olds)} continue "
                     f"({', '.join(winners)})")
    if lines:
        store.save_search_history(history)
    return lines


def _train(ray, sweep: Sweep, todo: list[RunPlan], need: dict, max_parallel: int | None,
           echo: Callable[[str], None], rungs: dict[str, tuple[int, int]] | None = None) -> dict[str, str]:
    """Train the runs as packs (or process groups) on Ray until all have ended; run_id -> status. rungs: a
    search's round (the runs stop at their rung). Ctrl-C cancels what is running and re-raises."""
    store = sweep.store
    threads = max(1, int(sweep.spec.resources.cpus))
    shards, replicas = sweep.spec.resources.layout
    root, cache = str(store.dir.parent), str(default_cache_root())
    # each pack's worker gets its model's single-model sweep (SweepSpec.per_model)
    spec_data = {m: one.model_dump(mode="json", exclude_unset=True) for m, (one, _) in sweep.models.items()}
    if shards * replicas > 1:  # each run is a group of processes: no packs (orchestrator/multiprocess_run.py)
        packs = [[run] for run in todo]
        group = ray.remote(train_group).options(num_cpus=0, max_retries=sweep.spec.retries)

        def submit(pack):
            return group.remote(spec_data[pack[0].model], asdict(pack[0]), root, cache, threads, need,
                                sweep.spec.retries, (rungs or {}).get(pack[0].run_id))
    else:
        packs = pack_runs(todo, sweep.spec.pack_size, need.get("memory"))
        remote = ray.remote(train_pack).options(**process_options(need), max_retries=sweep.spec.retries)

        def submit(pack):
            mine = {r.run_id: rungs[r.run_id] for r in pack if r.run_id in rungs} if rungs else None
            return remote.remote(spec_data[pack[0].model], [asdict(r) for r in pack], root, cache, threads, mine)
    waiting = list(packs)
    in_flight: dict = {}
    statuses: dict[str, str] = {}
    progress = Progress(sweep, todo, echo, rungs)
    limit = max_parallel or len(packs)
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < limit:
                pack = waiting.pop(0)
                in_flight[submit(pack)] = pack
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                pack = in_flight.pop(ref)
                try:
                    statuses.update(ray.get(ref))
                except Exception as err:  # the pack failed for good: its unfinished runs get failed rows
                    _record_failure(sweep, pack, err, statuses)
            progress.show(statuses, sum(len(p) for p in in_flight.values()))
    except KeyboardInterrupt:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
    progress.show(statuses, 0, force=True)
    return statuses


def _wait_for_holders(store, held: list[str], echo: Callable[[str], None]) -> None:
    """A search's runs left to another process that holds their locks (a killed driver's workers finishing
    their pack, say): the round is decided on what they record, so wait until their locks are released."""
    waiting = set(held) & store.running()
    if waiting:
        echo(f"search: waiting for {len(waiting)} runs another process holds (their lock) to reach their rung")
    while waiting:
        time.sleep(POLL_S)
        waiting &= store.running()


def _search_round(sweep: Sweep, store) -> Round:
    """The search's next round, from the rung records, curves and rows on disk."""
    ids = [r.run_id for r in sweep.runs]
    cells = search_cells(sweep.runs, sweep.spec.search.axis)
    records = store.rungs(ids)
    curves = {rid: store.curve(rid) for rid in records}
    return plan_round(cells, records, curves, sweep.spec.search, store.done(ids), store.search_history())


def _search_summary(sweep: Sweep, store, step: Round, echo: Callable[[str], None]) -> None:
    """Each cell's winner (`step`: the search's last round) and the compute spent against the full grid's."""
    spent = store.flops_spent(r.run_id for r in sweep.runs)
    full = sum(r.flops() for r in sweep.runs)
    axis = sweep.spec.search.axis
    by_id = {r.run_id: r for r in sweep.runs}
    rows = store.rows_of(rid for winners in step.winners.values() for rid in winners)
    for winners in step.winners.values():
        for rid in winners:
            row = rows.get(rid, {})
            echo(f"search winner {rid}: {axis} {by_id[rid].axes.get(axis)} (n_latents {by_id[rid].n_latents}), "
                 f"nmse {row.get('nmse', float('nan')):.4g}")
    echo(f"search: spent {spent:.3g} FLOPs training, {spent / max(full, 1e-300):.0%} of the full grid's {full:.3g}; "
         f"{len(step.stopped)} runs stopped early")


def _record_failure(sweep: Sweep, pack: list[RunPlan], err: Exception, statuses: dict[str, str]) -> None:
    message = str(getattr(err, "cause", None) or err).strip().splitlines()
    reason = f"{type(err).__name__}: {message[-1] if message else ''}"
    finished = sweep.store.done(r.run_id for r in pack)
    for run in pack:
        if run.run_id in finished:
            continue
        row = run_row(sweep.of(run)[0], run, None, null_downstream("run failed"), now_utc(), reason)
        sweep.store.write_run(row)
        statuses[run.run_id] = "failed"
