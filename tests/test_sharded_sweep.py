"""A sweep whose runs are trained by groups of processes (resources.shards) on a real local Ray: the rows
equal the single-process rows, and a group that loses a process resumes from its sharded checkpoint."""
from __future__ import annotations

import json

import pytest
from test_orchestration import (
    BATCH,
    SweepThread,
    assert_each_run_once_and_ok,
    checkpoint_tokens,
    first_progress_from_another_process,
    kill_worker,
    planned_ids,
    sweep,
    wait_mid_run,
    write_sweep,
)

from analysis.results import load_curves, load_runs
from orchestrator.plan import plan_sweep
from sae_core.errors import ConfigError
from sae_core.sae import SAE

GRID = {"arch": ["topk"], "n_latents": [64], "k": [4]}
COMPARED = ["nmse", "mse", "l0", "l1", "dead_frac", "dead_frac_eval", "tokens", "steps", "flops"]


def sharded(tmp_path, name: str, shards: int | None, **kw):
    folder = tmp_path / name
    folder.mkdir()
    resources = {"cpus": 1, **({"shards": shards} if shards else {})}
    path = write_sweep(folder, grid=GRID, resources=resources, **kw)
    return path, folder / "results"


def assert_rows_match(a_dir, b_dir, run_id):
    a, b = (load_runs(d).set_index("run_id").loc[run_id] for d in (a_dir, b_dir))
    assert a["status"] == b["status"] == "ok"
    for col in COMPARED:
        assert a[col] == pytest.approx(b[col], rel=1e-5, abs=1e-6), col
    ca, cb = (c[c["run_id"] == run_id] for c in (load_curves(a_dir), load_curves(b_dir)))
    assert ca["step"].tolist() == cb["step"].tolist()
    assert ca["nmse"].to_numpy() == pytest.approx(cb["nmse"].to_numpy(), abs=1e-5)
    wa, wb = (SAE.load(d / "saes" / run_id).net.state_dict() for d in (a_dir, b_dir))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_sweep_with_two_shards_matches_the_unsharded_row(ray_local, tmp_path):
    one_path, one_results = sharded(tmp_path, "one", None, train_tokens=24 * BATCH)
    two_path, two_results = sharded(tmp_path, "two", 2, train_tokens=24 * BATCH)
    (rid,) = planned_ids(one_path, one_results)
    assert planned_ids(two_path, two_results) == {rid}  # resources are not part of a run's identity
    assert sweep(one_path, one_results)[0] == 0
    rc, thread = sweep(two_path, two_results)
    assert rc == 0, thread.lines
    assert_each_run_once_and_ok(two_results / "t", {rid}, 24 * BATCH)
    assert_rows_match(one_results / "t", two_results / "t", rid)
    # the sharded checkpoint the group wrote: one file per shard, committed by the manifest
    manifest = json.loads((two_results / "t" / "saes" / rid / "trainer_state.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [[0, 32], [32, 64]]


def test_group_that_loses_a_process_resumes_from_its_sharded_checkpoint(ray_local, tmp_path):
    tokens = 300 * BATCH
    path, results = sharded(tmp_path, "two", 2, train_tokens=tokens, retries=1)
    sweep_dir, (rid,) = results / "t", planned_ids(path, results)
    thread = SweepThread(path, results)
    thread.start()
    _, prog = wait_mid_run(sweep_dir, thread)
    kill_worker(prog["pid"])  # rank 0's process
    at_kill = checkpoint_tokens(sweep_dir, rid)
    retry = first_progress_from_another_process(sweep_dir, rid, prog["pid"], thread)
    assert thread.result(timeout=240) == 0, thread.lines
    assert 0 < at_kill < tokens and retry["tokens"] > at_kill  # the new group went on from the checkpoint
    assert_each_run_once_and_ok(sweep_dir, {rid}, tokens)
    one_path, one_results = sharded(tmp_path, "one", None, train_tokens=tokens)
    assert sweep(one_path, one_results, timeout=240)[0] == 0
    assert_rows_match(one_results / "t", sweep_dir, rid)


@pytest.mark.parametrize("resources, grid, message", [
    ({"shards": 2}, {"arch": ["relu"], "n_latents": [64]}, "relu cannot be sharded over latents"),
    ({"shards": 3}, GRID, "shards: 3 does not divide n_latents (64)"),
    ({"replicas": 3}, GRID, f"train.batch_size: {BATCH} is not a multiple of replicas (3)"),
])
def test_sweep_asking_for_a_layout_its_runs_cannot_take_fails_at_plan_time(tmp_path, resources, grid, message):
    path = write_sweep(tmp_path, grid=grid, resources={"cpus": 1, **resources})
    with pytest.raises(ConfigError) as err:
        plan_sweep(path, tmp_path / "results")
    assert str(path) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "results").exists()


def test_group_larger_than_the_cluster_is_refused_before_anything_runs(ray_local, tmp_path):
    from orchestrator.scheduler import run_sweep
    path = write_sweep(tmp_path, grid=GRID, resources={"cpus": 1, "shards": 4})
    with pytest.raises(ConfigError, match="shards x replicas = 4 processes .* the cluster holds 2"):
        run_sweep(path, tmp_path / "results", echo=lambda _: None)
    assert not list((tmp_path / "results").glob("t/runs/*"))


def test_a_group_left_behind_by_a_dead_coordinator_is_removed_first(ray_local, tmp_path):
    """A coordinator whose node died leaves its placement group (and ranks) holding the cluster: the next
    attempt removes it by name instead of waiting behind it forever."""
    from ray.util.placement_group import placement_group

    path, results = sharded(tmp_path, "two", 2, train_tokens=8 * BATCH)
    (rid,) = planned_ids(path, results)
    stale = placement_group([{"CPU": 1}] * 2, name=f"sae-scaling/t/{rid}")
    ray_local.get(stale.ready(), timeout=30)  # the whole 2-CPU cluster
    rc, thread = sweep(path, results, timeout=120)
    assert rc == 0, thread.lines
    assert_each_run_once_and_ok(results / "t", {rid}, 8 * BATCH)
