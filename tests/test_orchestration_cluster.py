"""Sweeps on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster: a head with no CPUs and two
1-CPU worker nodes on this machine): custom resources pick the node, and a node lost mid-run has its pack
retried on the other node from the checkpoints.

A process can be connected to one Ray at a time: the module fixture shuts down the session's local Ray
first (`ray_local` starts a new one for any later test that needs it) and its own cluster at the end."""
from __future__ import annotations

import pytest
from test_orchestration import (
    BATCH,
    SweepThread,
    assert_each_run_once_and_ok,
    checkpoint_tokens,
    first_progress_from_another_process,
    planned_ids,
    read_progress,
    sweep,
    wait_gone,
    wait_mid_run,
    write_sweep,
)

FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                     "health_check_timeout_ms": 500}  # a dead node is noticed in ~1 s instead of ~15 s


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cl = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "_system_config": FAST_HEALTH_CHECK})
    try:
        nodes = {name: cl.add_node(num_cpus=1, resources={name: 1}, memory=2 * 1024**3,
                                   object_store_memory=100 * 1024**2) for name in ("node_a", "node_b")}
        ray.init(address=cl.address, log_to_driver=False, configure_logging=False)
        cl.wait_for_nodes(timeout=60)
        yield cl, nodes
    finally:
        ray.shutdown()
        cl.shutdown()


def test_custom_resource_places_every_pack_on_its_node(cluster, tmp_path):
    _, nodes = cluster
    path = write_sweep(tmp_path, train_tokens=16 * BATCH, resources={"cpus": 1, "custom": {"node_b": 1}})
    results = tmp_path / "results"
    ids = planned_ids(path, results)
    rc, _ = sweep(path, results)
    assert rc == 0
    assert_each_run_once_and_ok(results / "t", ids, 16 * BATCH)
    # every run reported progress from a worker of node_b (the fake nodes share one hostname, not a node id)
    where = {rid: read_progress(results / "t", rid)["node"] for rid in ids}
    assert where == {rid: nodes["node_b"].node_id for rid in ids}


def test_node_lost_mid_run_is_retried_on_the_other_node(cluster, tmp_path):
    cl, nodes = cluster
    tokens = 600 * BATCH
    # both runs in one pack, on whichever node takes it
    path = write_sweep(tmp_path, train_tokens=tokens, grid={"arch": ["topk"], "n_latents": [64], "k": [4, 8]},
                       pack_size=2, retries=1)
    results = tmp_path / "results"
    sweep_dir, ids = results / "t", planned_ids(path, results)
    thread = SweepThread(path, results)
    thread.start()
    rid, prog = wait_mid_run(sweep_dir, thread)
    (victim,) = [n for n in nodes.values() if n.node_id == prog["node"]]
    (survivor,) = [n for n in nodes.values() if n is not victim]
    cl.remove_node(victim, allow_graceful=False)  # SIGKILLs its raylet: a node failure
    wait_gone(prog["pid"])  # its worker goes down with the raylet, but not at once
    at_kill = checkpoint_tokens(sweep_dir, rid)
    retry = first_progress_from_another_process(sweep_dir, rid, prog["pid"], thread)
    assert thread.result(180) == 0
    assert retry["node"] == survivor.node_id
    assert 0 < at_kill < tokens and retry["tokens"] == at_kill + BATCH  # resumed from the checkpoint
    assert_each_run_once_and_ok(sweep_dir, ids, tokens)
    assert {read_progress(sweep_dir, r)["node"] for r in ids} == {survivor.node_id}
