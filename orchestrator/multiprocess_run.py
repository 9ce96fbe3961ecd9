"""A run trained by a group of shards x replicas processes on the Ray cluster.

The scheduler starts `train_group` as an ordinary task (no resources of its own, retried like a pack if its
node dies). It reserves one placement-group bundle per process (PACK: the shards of a run land on as few
nodes as possible, since their traffic is per step), finds rank 0's address, starts one `train_rank` task
per bundle and waits for all. When a process is lost (its worker or node died, or a peer's collective
failed because of it) it stops the rest and starts the group again, up to the sweep's `retries` times;
the new group resumes from the last committed sharded checkpoint. An error raised by the training code
itself on every rank is not retried: it would fail again.

Why a placement group of plain tasks and not Ray Train's TorchTrainer: the rendezvous is the only thing
TorchTrainer would add here, and it brings its own run storage, checkpoint registry and failure policy
that would sit beside the sweep's (run locks, per-shard checkpoints, Parquet rows). Plain tasks keep one
retry story for packs and groups, cost ~0.1 s to start instead of seconds, and need nothing beyond
`ray[default]`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from orchestrator.plan import RunPlan
from orchestrator.spec import parse_spec
from orchestrator.store import ResultsStore
from orchestrator.worker import LOCK_WAIT_S, train_rank

GRACE_S = 10.0  # after one process fails, how long its peers get to report their own outcome


@dataclass
class _Failure:
    error: Exception
    lost_process: bool  # a process died (or its peers lost it): worth a retry from the checkpoint


def _rendezvous() -> tuple[str, int]:
    """Rank 0's address: this node's IP and a free port on it (run inside rank 0's bundle)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _lost(err: Exception) -> bool:
    import ray.exceptions as rex

    if isinstance(err, rex.TaskCancelledError):  # we stopped it
        return False
    if not isinstance(err, rex.RayTaskError):  # worker crashed, node died, out of memory: Ray's own errors
        return True
    cause = getattr(err, "cause", None)
    # a peer's death surfaces in the survivors' collectives: NCCL raises DistError, gloo a RuntimeError
    return isinstance(cause, torch.distributed.DistError) or "closed by peer" in str(cause) or \
        "Connection reset" in str(cause)


def _wait_group(ray, refs: list) -> _Failure | None:
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except Exception as first:
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=GRACE_S)
            for ref in pending:
                ray.cancel(ref, force=True)
            errors = [first]
            for ref in refs:
                if ref != ready[0]:
                    try:
                        ray.get(ref, timeout=GRACE_S)
                    except Exception as err:
                        errors.append(err)
            lost = any(_lost(e) for e in errors)
            # report the training code's own error when there is one, not a peer's broken connection
            own = next((e for e in errors if not _lost(e) and not isinstance(e, ray.exceptions.TaskCancelledError)),
                       first)
            return _Failure(first if lost else own, lost)
    return None


def process_options(need: dict) -> dict:
    """Ray task options asking for a resource dict (CPU, GPU, memory, custom resources)."""
    opts = {"num_cpus": need.get("CPU", 0), "num_gpus": need.get("GPU", 0)}
    if "memory" in need:
        opts["memory"] = need["memory"]
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        opts["resources"] = custom
    return opts


def train_group(spec_data: dict, run: dict, results_root: str, cache_root: str | None, threads: int,
                bundle: dict, retries: int, rung: tuple[int, int] | None = None) -> dict[str, str]:
    """Train one run on shards x replicas processes, each given `bundle` (Ray resources); run_id -> status.
    rung: a search's (rung, tokens) to stop at."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    spec = parse_spec(spec_data)
    plan = RunPlan(**run)
    store = ResultsStore(results_root, spec.name)
    shards, replicas = spec.resources.layout
    world = shards * replicas
    rungs = {plan.run_id: rung} if rung else None
    if plan.run_id in store.ended([plan.run_id], rungs):
        return {}
    with store.lock(plan.run_id, LOCK_WAIT_S) as owned:
        if not owned or plan.run_id in store.ended([plan.run_id], rungs):
            return {}
        # A coordinator that died (its node lost) leaves its group and ranks behind, holding resources and writing
        # this run's checkpoints: removing the named group kills them before a new one starts.
        name = f"sae-scaling/{spec.name}/{plan.run_id}"
        try:
            remove_placement_group(ray.util.get_placement_group(name))
        except ValueError:  # none left behind
            pass
        group = placement_group([bundle] * world, strategy="PACK", name=name)
        try:
            ray.get(group.ready())
            for attempt in range(retries + 1):
                def on(i: int) -> PlacementGroupSchedulingStrategy:
                    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)

                address, port = ray.get(ray.remote(_rendezvous).options(num_cpus=0, scheduling_strategy=on(0)).remote())
                rank_task = ray.remote(train_rank)
                refs = [rank_task.options(**process_options(bundle), max_retries=0, scheduling_strategy=on(i)).remote(
                    spec_data, run, results_root, cache_root, threads, i, shards, replicas, address, port, rung)
                    for i in range(world)]
                failure = _wait_group(ray, refs)
                if failure is None:
                    return ray.get(refs[0])
                if not failure.lost_process or attempt == retries:
                    raise failure.error
        finally:
            remove_placement_group(group)
    return {}
