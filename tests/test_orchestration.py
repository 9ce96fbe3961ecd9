"""Sweeps end to end on a real local Ray (the session's `ray_local`, 2 CPUs): results and their types, the
no-op re-run, a killed worker retried from its checkpoint, resume after a failed run, one model forward per
batch for a whole pack, resources and addresses refused before any work, diverged runs recorded.
The multi-node checks (custom resources, a node lost mid-run) are in test_orchestration_cluster.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_TEXT

from analysis.results import load_curves, load_recovery, load_runs
from orchestrator.plan import plan_sweep
from orchestrator.scheduler import _check_reachable, run_sweep
from orchestrator.worker import train_pack
from sae_core.checkpoint import MANIFEST
from sae_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BATCH = 512


# --- helpers (also used by test_orchestration_cluster.py) ------------------------------------------------
def write_sweep(folder: Path, name: str = "t", train_tokens: int = 40960, grid: dict | None = None,
                **fields) -> Path:
    """A synthetic sweep (no model): 2x2 TopK grid, one run per pack so runs can be killed one by one."""
    spec = {"name": name,
            "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                     "train_tokens": train_tokens, "eval_tokens": 1024},
            "grid": grid or {"arch": ["topk"], "n_latents": [32, 64], "k": [4, 8]},
            "train": {"batch_size": BATCH, "checkpoint_every_tokens": 8 * BATCH, "init_samples": BATCH},
            "resources": {"cpus": 1}, "pack_size": 1, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class SweepThread(threading.Thread):
    """run_sweep in a daemon thread, so the test can act while it runs and a hang fails instead of blocking."""

    def __init__(self, path: Path, results: Path, **kw):
        super().__init__(daemon=True)
        self.path, self.results, self.kw = path, results, kw
        self.lines: list[str] = []
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.seconds = float("nan")

    def run(self):
        t0 = time.perf_counter()
        try:
            self.rc = run_sweep(self.path, self.results, echo=self.lines.append, **self.kw)
        except BaseException as err:  # re-raised in the test's thread by result()
            self.error = err
        self.seconds = time.perf_counter() - t0

    def result(self, timeout: float = 120) -> int:
        self.join(timeout)
        assert not self.is_alive(), f"run_sweep still running after {timeout} s; last output: {self.lines[-3:]}"
        if self.error is not None:
            raise self.error
        return self.rc


def sweep(path: Path, results: Path, timeout: float = 120, **kw) -> tuple[int, SweepThread]:
    thread = SweepThread(path, results, **kw)
    thread.start()
    return thread.result(timeout), thread


def read_progress(sweep_dir: Path, run_id: str) -> dict | None:
    try:
        return json.loads((sweep_dir / "progress" / f"{run_id}.json").read_text())
    except (OSError, ValueError):  # not there yet, or replaced while reading
        return None


def checkpoint_tokens(sweep_dir: Path, run_id: str) -> int:
    return json.loads((sweep_dir / "saes" / run_id / MANIFEST).read_text())["state"]["tokens"]


def wait_mid_run(sweep_dir: Path, thread: SweepThread, timeout: float = 60) -> tuple[str, dict]:
    """A run in training: it reported progress (its worker's pid), has a checkpoint on disk, has no row yet."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert thread.is_alive(), f"the sweep ended before a run could be interrupted: {thread.lines[-3:]}"
        for path in sorted((sweep_dir / "progress").glob("*.json")):
            rid, prog = path.stem, read_progress(sweep_dir, path.stem)
            if (prog and 0 < prog["tokens"] < prog["total"] and (sweep_dir / "saes" / rid / MANIFEST).is_file()
                    and not (sweep_dir / "runs" / f"{rid}.parquet").exists()):
                return rid, prog
        time.sleep(0.02)
    raise AssertionError(f"no run reached its first checkpoint within {timeout} s")


def kill_worker(pid: int) -> None:
    """SIGKILL a Ray worker process (and nothing else: never this process, never a non-Ray one)."""
    assert pid != os.getpid()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert cmdline.startswith(b"ray::"), cmdline[:200]
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until the process has exited (or is a zombie): from then on it writes nothing and holds no lock."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (OSError, IndexError):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive {timeout} s after its kill")


def first_progress_from_another_process(sweep_dir: Path, run_id: str, pid: int, thread: threading.Thread,
                                        timeout: float = 120) -> dict:
    """The first progress record the run's next attempt writes (right after its first step)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = thread.is_alive()
        prog = read_progress(sweep_dir, run_id)
        if prog and prog["pid"] != pid:
            return prog
        if not alive:
            break
        time.sleep(0.01)
    raise AssertionError(f"{run_id}: no progress from a new attempt (still pid {pid})")


def assert_each_run_once_and_ok(sweep_dir: Path, run_ids: set[str], total_tokens: int) -> pd.DataFrame:
    runs = load_runs(sweep_dir)
    assert sorted(runs["run_id"]) == sorted(run_ids)  # one row per planned run, none missing or extra
    assert (runs["status"] == "ok").all(), runs[["run_id", "status", "error"]]
    assert (runs["tokens"] == total_tokens).all() and (runs["steps"] == total_tokens // BATCH).all()
    curves = load_curves(sweep_dir)
    for rid in run_ids:
        steps = curves.loc[curves["run_id"] == rid, "step"].tolist()
        assert steps, rid
        assert all(a < b for a, b in zip(steps, steps[1:])), f"{rid}: curve steps not strictly increasing: {steps}"
        assert steps[-1] == total_tokens // BATCH
    return runs


def planned_ids(path: Path, results: Path) -> set[str]:
    return {r.run_id for r in plan_sweep(path, results).runs}


# --- 1. a grid completes; running it again is a no-op -------------------------------------------------------
def test_grid_completes_with_typed_results_and_rerun_is_a_noop(ray_local, tmp_path):
    path, results = write_sweep(tmp_path), tmp_path / "results"
    ids = planned_ids(path, results)
    assert len(ids) == 4
    rc, _ = sweep(path, results)
    assert rc == 0
    sweep_dir = results / "t"
    runs = assert_each_run_once_and_ok(sweep_dir, ids, 40960)
    assert pd.api.types.is_integer_dtype(runs["n_latents"])  # Int64 (nullable) by design: analysis/results.py
    assert runs["k"].dtype == "Int64" and runs["nmse"].dtype == "float64"
    assert str(runs["started_at"].dtype) == "datetime64[us, UTC]" and (runs["started_at"] <= runs["finished_at"]).all()
    assert set(zip(runs["n_latents"], runs["k"])) == {(32, 4), (32, 8), (64, 4), (64, 8)}
    assert runs["nmse"].between(0, 1).all()
    for rid in ids:
        assert (sweep_dir / "saes" / rid / "sae.safetensors").is_file()

    before = runs.set_index("run_id")["finished_at"]
    rc, again = sweep(path, results, timeout=30)
    assert rc == 0 and again.seconds < 10
    assert len(again.lines) == 1 and "4 already done" in again.lines[0], again.lines  # nothing scheduled
    after = load_runs(sweep_dir).set_index("run_id")["finished_at"]
    pd.testing.assert_series_equal(before.sort_index(), after.sort_index())


# --- 2. a worker killed mid-run is retried from its checkpoint ------------------------------------------------
KILL_TOKENS = 400 * BATCH  # a few seconds per run: time to kill one


def start_and_kill_one(tmp_path: Path, retries: int):
    """Start a 2-run sweep, SIGKILL the worker of a run mid-way; the sweep thread, its paths, the killed run,
    its last progress record and the tokens of its last checkpoint."""
    path = write_sweep(tmp_path, train_tokens=KILL_TOKENS,
                       grid={"arch": ["topk"], "n_latents": [64], "k": [4, 8]}, retries=retries)
    results = tmp_path / "results"
    sweep_dir, ids = results / "t", planned_ids(path, results)
    thread = SweepThread(path, results)
    thread.start()
    rid, prog = wait_mid_run(sweep_dir, thread)
    kill_worker(prog["pid"])
    at_kill = checkpoint_tokens(sweep_dir, rid)  # the dead process can no longer move it
    return thread, path, results, sweep_dir, ids, rid, prog, at_kill


def test_killed_worker_is_retried_from_its_checkpoint(ray_local, tmp_path):
    tokens = KILL_TOKENS
    thread, _, _, sweep_dir, ids, rid, prog, at_kill = start_and_kill_one(tmp_path, retries=1)
    retry = first_progress_from_another_process(sweep_dir, rid, prog["pid"], thread)
    assert thread.result() == 0
    # the retry went on from the checkpoint (its first step is the one after it), not from step 0
    assert 0 < at_kill < tokens and retry["tokens"] == at_kill + BATCH
    assert_each_run_once_and_ok(sweep_dir, ids, tokens)


# --- 3. a failed run is resumed by the next `run`; finished runs are left alone -------------------------------
def test_interrupted_sweep_resumes_and_skips_finished_runs(ray_local, tmp_path):
    tokens = KILL_TOKENS
    thread, path, results, sweep_dir, ids, rid, prog, at_kill = start_and_kill_one(tmp_path, retries=0)
    assert thread.result() == 1  # retries: 0, so the pack failed for good
    first = load_runs(sweep_dir).set_index("run_id")
    assert first.loc[rid, "status"] == "failed" and "WorkerCrashedError" in first.loc[rid, "error"]
    (other,) = ids - {rid}
    assert first.loc[other, "status"] == "ok"

    again = SweepThread(path, results)
    again.start()
    retry = first_progress_from_another_process(sweep_dir, rid, prog["pid"], again)
    assert again.result() == 0
    assert any("1 already done" in line for line in again.lines), again.lines
    assert retry["tokens"] == at_kill + BATCH  # resumed from the failed attempt's checkpoint
    runs = assert_each_run_once_and_ok(sweep_dir, ids, tokens).set_index("run_id")
    assert runs.loc[other, "finished_at"] == first.loc[other, "finished_at"]  # not re-run, row untouched
    assert runs.loc[rid, "finished_at"] > first.loc[rid, "finished_at"]


# --- 4. a pack shares one model forward per batch -------------------------------------------------------------
def test_pack_of_four_runs_does_one_model_forward_per_batch(tiny_models, tmp_path, monkeypatch):
    from sae_core.lm.hooks import ActivationExtractor
    from sae_core.sources.streaming import StreamingActivations

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_TEXT * 3):
        (corpus / f"doc{i:03d}.txt").write_text(text)
    batch = 256
    spec = {"name": "pack", "model": str(tiny_models["gpt2"]), "hook": {"site": "resid_post", "layers": [1]},
            # batch_rows 64 >= the token rows of one batch: one extractor call per batch
            "data": {"text": {"files": str(corpus / "*.txt")}, "cache": False, "context_length": 16,
                     "train_tokens": 2048, "eval_tokens": 256, "batch_rows": 64},
            "grid": {"arch": ["topk"], "n_latents": [32, 64], "k": [4, 8]},
            "train": {"batch_size": batch, "init_samples": batch}, "pack_size": 4}
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    plan = plan_sweep(path, results)
    assert len(plan.runs) == 4 and len({r.stream for r in plan.runs}) == 1

    counts = {"forwards": 0, "training_forwards": 0, "batches": 0}
    in_batch = [False]
    forward, train_batch = ActivationExtractor.__call__, StreamingActivations.train_batch

    def counting_forward(self, *args, **kw):
        counts["forwards"] += 1
        counts["training_forwards"] += in_batch[0]
        return forward(self, *args, **kw)

    def counting_batch(self, *args, **kw):
        counts["batches"] += 1
        in_batch[0] = True
        try:
            return train_batch(self, *args, **kw)
        finally:
            in_batch[0] = False

    monkeypatch.setattr(ActivationExtractor, "__call__", counting_forward)
    monkeypatch.setattr(StreamingActivations, "train_batch", counting_batch)
    finished = train_pack(plan.spec.model_dump(mode="json", exclude_unset=True), [asdict(r) for r in plan.runs],
                          str(results))
    assert finished == {r.run_id: "ok" for r in plan.runs}
    steps = 2048 // batch
    # one forward per training batch for the whole pack, not one per run (4 x steps)
    assert counts["batches"] == steps and counts["training_forwards"] == steps, counts

    runs = load_runs(results / "pack")
    assert len(runs) == 4 and (runs["steps"] == steps).all()
    assert (runs["downstream_metric"] == "ce").all() and runs["ce_sae"].notna().all()
    recovery = load_recovery(results / "pack")
    assert set(recovery["run_id"]) == {r.run_id for r in plan.runs}


# --- 6. resources no node can give: refused at once, nothing written ---------------------------------------------
@pytest.mark.parametrize("resources, named", [({"gpus": 1}, "GPU 1"), ({"gpus": 2}, "GPU 1 per process"),
                                              ({"cpus": 1, "custom": {"no_such_node": 1}}, "no_such_node 1")])
def test_unsatisfiable_resources_are_refused_before_any_work(ray_local, tmp_path, resources, named):
    path, results = write_sweep(tmp_path, resources=resources), tmp_path / "results"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="resources") as err:
        sweep(path, results, timeout=30)  # a demand Ray cannot place would otherwise pend forever
    assert time.perf_counter() - t0 < 15
    assert named in str(err.value)
    assert not results.exists()


# --- 7. an unreachable --address: refused at once, nothing written --------------------------------------------
def test_unreachable_address_is_a_config_error(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"--address 127\.0\.0\.2:1: unreachable"):
        _check_reachable("127.0.0.2:1")  # nothing listens on port 1
    with pytest.raises(ConfigError, match="--address http://:6379"):
        _check_reachable("http://:6379")
    assert time.perf_counter() - t0 < 5
    _check_reachable("auto")  # left to Ray

    # the whole CLI, in a fresh process (this one's Ray is already connected and would be reused)
    path, results = write_sweep(tmp_path), tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--address", "127.0.0.2:1",
                           "--results", str(results)], cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert "--address 127.0.0.2:1: unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert not results.exists()


# --- 8. a diverged run is recorded and the rest go on ----------------------------------------------------------
def test_diverged_run_is_recorded_and_the_sweep_goes_on(ray_local, tmp_path):
    # one pack: the diverging run must not take its pack-mate down
    path = write_sweep(tmp_path, grid={"arch": ["topk"], "n_latents": [32], "k": [4], "lr": ["auto", 1.0e30]},
                       pack_size=2)
    results = tmp_path / "results"
    rc, _ = sweep(path, results)
    assert rc == 0  # diverged counts as done: re-running would diverge again
    runs = load_runs(results / "t").set_index("lr")
    assert len(runs) == 2
    bad = runs.loc[1.0e30]
    assert bad["status"] == "diverged" and "non-finite" in bad["error"]
    assert runs.drop(index=1.0e30)["status"].tolist() == ["ok"]
    rc, again = sweep(path, results, timeout=30)
    assert rc == 0 and any("2 already done" in line for line in again.lines), again.lines
