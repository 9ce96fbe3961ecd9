"""Faults a sweep's results must survive, each through the command line as a user meets it: broken results files
(truncated, garbage) are named in one line and re-trained by the next `run` (set aside, never deleted), read-only
storage, grid points removed from a sweep (ghost rows), changed activation files, a run too large for any node,
files that honour the umask, and one-line errors instead of tracebacks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ensure_local_ray
from test_orchestration import BATCH, sweep, write_sweep

from orchestrator.cli import main
from orchestrator.jobs import _submit_job, stage
from orchestrator.store import ResultsStore
from sae_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GRID = {"arch": ["topk"], "n_latents": [32], "k": [4, 8]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _ray_local_session):
    """A finished 2-run sweep (its YAML and results root), copied by each test that breaks it."""
    ensure_local_ray(_ray_local_session)
    folder = tmp_path_factory.mktemp("finished")
    path = write_sweep(folder, train_tokens=8 * BATCH, grid=GRID)
    rc, _ = sweep(path, folder / "results")
    assert rc == 0
    return path, folder / "results"


@pytest.fixture
def copy(finished, tmp_path):
    """The finished sweep copied into this test's folder: (sweep YAML, results root, results/t)."""
    path, results = finished
    shutil.copytree(results, tmp_path / "results")
    shutil.copy(path, tmp_path / path.name)
    return tmp_path / path.name, tmp_path / "results", tmp_path / "results" / "t"


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 50)


# --- broken results files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("table", ["runs", "curves"])
def test_a_broken_results_file_is_named_and_the_next_run_trains_it_again(capsys, ray_local, copy, how, table):
    path, results, sweep_dir = copy
    victim = sorted((sweep_dir / table).glob("*.parquet"))[0]
    rid = victim.stem
    corrupt(victim, how)
    bad = victim.read_bytes()
    readers = [["fit", sweep_dir, "--out", sweep_dir.parent / "fits"],
               ["figures", sweep_dir, "--out", sweep_dir.parent / "figs"]]
    for argv in readers + ([["results", sweep_dir]] if table == "runs" else []):  # results reads runs/ alone
        rc, _, err = cli(capsys, *argv)
        line = one_line_error(err)
        assert rc == 2 and str(victim) in line and "sae-scaling run" in line, (argv, line)
    rc, out, err = cli(capsys, "status", sweep_dir)
    assert rc == 2 and "Traceback" not in err and f"{rid} broken: {victim}" in out and "1 broken" in out, out

    rc, out, _ = cli(capsys, "run", path, "--dry-run", "--results", results)
    assert rc == 0 and any(line.startswith(rid) and "broken" in line for line in out.splitlines()), out
    rc, again = sweep(path, results)
    assert rc == 0
    assert any(f"run {rid}: unreadable files set aside" in line for line in again.lines), again.lines
    assert "1 already done" in " ".join(again.lines)
    aside = list((sweep_dir / "broken" / table).glob(f"{victim.name}.*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, not deleted
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert rc == 0 and "2 ok" in out, out
    rc, out, _ = cli(capsys, "results", sweep_dir, "--format", "json")
    assert sorted(r["status"] for r in json.loads(out)) == ["ok", "ok"]


@pytest.mark.parametrize("name, how", [("sae.safetensors", "truncated"), ("config.json", "garbage")])
def test_a_broken_sae_folder_counts_as_not_done(capsys, ray_local, copy, name, how):
    path, results, sweep_dir = copy
    weights = next((sweep_dir / "saes").glob(f"*/{name}"))
    corrupt(weights, how)
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert rc == 2 and str(weights) in out
    rc, again = sweep(path, results)
    assert rc == 0 and "1 already done" in " ".join(again.lines), again.lines
    assert ResultsStore.at(sweep_dir).broken([weights.parent.name]) == {}


def test_garbage_plan_is_named_by_status_and_rewritten_by_run(capsys, ray_local, copy):
    path, results, sweep_dir = copy
    (sweep_dir / "plan.json").write_text("{not json")
    rc, _, err = cli(capsys, "status", sweep_dir)
    assert rc == 2 and "plan.json" in one_line_error(err) and "sae-scaling run" in err
    rc, again = sweep(path, results)
    assert rc == 0 and "2 already done" in again.lines[0]
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert rc == 0 and "2 runs: 2 ok" in out


# --- edited sweeps: only planned runs count ------------------------------------------------------------------
def test_removed_grid_points_leave_the_analysis_but_stay_on_disk(capsys, ray_local, copy):
    path, results, sweep_dir = copy
    spec = yaml.safe_load(path.read_text())
    spec["grid"]["k"] = [4, 16]  # k 8 removed, k 16 added
    path.write_text(yaml.safe_dump(spec))
    rc, out, _ = cli(capsys, "run", path, "--dry-run", "--results", results)
    assert "2 runs (1 done)" in out and "pending: new grid point" in out, out
    rc, again = sweep(path, results)
    assert rc == 0 and "2 runs, 1 already done" in again.lines[0], again.lines
    rc, out, _ = cli(capsys, "results", sweep_dir, "--format", "json")
    assert sorted(r["k"] for r in json.loads(out)) == [4, 16]
    rc, out, _ = cli(capsys, "results", sweep_dir, "--format", "json", "--all")
    assert sorted(r["k"] for r in json.loads(out)) == [4, 8, 16]
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert out.startswith("t: 2 runs: 2 ok"), out
    from analysis.results import load_curves

    assert set(load_curves(sweep_dir).run_id) < set(load_curves(sweep_dir, all_runs=True).run_id)


# --- changed data -----------------------------------------------------------------------------------------------
def test_changed_activations_at_the_same_path_are_trained_again(capsys, ray_local, tmp_path):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((6000, 16), dtype=np.float32))
    path = write_sweep(tmp_path, train_tokens=4 * BATCH, grid=GRID,
                       data={"activations": str(acts), "train_tokens": 4 * BATCH, "eval_tokens": 1024})
    results = tmp_path / "results"
    assert sweep(path, results)[0] == 0
    np.save(acts, np.random.default_rng(1).standard_normal((6000, 16), dtype=np.float32))
    rc, out, _ = cli(capsys, "run", path, "--dry-run", "--results", results)
    assert "2 runs (0 done)" in out and out.count("inputs changed since run") == 2, out
    rc, again = sweep(path, results)
    assert rc == 0 and "2 runs, 0 already done" in again.lines[1], again.lines
    rc, out, _ = cli(capsys, "results", results / "t", "--format", "json")
    assert len(json.loads(out)) == 2


# --- read-only storage ------------------------------------------------------------------------------------------
def _read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix that runs with `folder` read-only: a read-only bind mount in a private mount namespace
    (root cannot be constrained by permissions), else as user nobody, for whom root's files are read-only."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,bind,ro {folder} {folder} && ! touch {folder}/.probe"],
                           capture_output=True)
    if probe.returncode == 0:
        return ["unshare", "-rm", "sh", "-c", f'mount --bind {folder} {folder} && '
                f'mount -o remount,bind,ro {folder} {folder} && exec "$@"', "ro"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        for sub in folder.rglob("*"):
            sub.chmod(0o555 if sub.is_dir() else 0o444)
        return []
    return None


def test_looking_at_results_on_read_only_storage(ray_local, copy, tmp_path):
    path, results, sweep_dir = copy
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)  # writable by nobody, where the fallback runs as nobody
    prefix = _read_only_prefix(results)
    if prefix is None:
        pytest.skip("no way to make a folder read-only here (no unshare, no setpriv)")
    env = {**os.environ, "MPLCONFIGDIR": str(out_dir / "mpl"), "HOME": str(out_dir)}
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    commands = [["status", sweep_dir], ["results", sweep_dir], ["fit", sweep_dir, "--out", out_dir / "fits"],
                ["figures", sweep_dir, "--out", out_dir / "figures"], ["run", path, "--results", results]]
    for argv in commands:
        proc = subprocess.run(prefix + [sys.executable, "-m", "orchestrator.cli", *map(str, argv)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        ok = (0, 1) if argv[0] == "fit" else (0,)  # fit: 1 when no law has enough points (one width here)
        assert proc.returncode in ok and "Traceback" not in proc.stderr, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    assert (out_dir / "fits" / "fits.json").is_file() and (out_dir / "figures" / "report.html").is_file()
    proc = subprocess.run(prefix + [sys.executable, "-m", "orchestrator.cli", "fit", str(sweep_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--out" in one_line_error(proc.stderr), proc.stderr
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before  # nothing written


# --- planning: memory, umask ---------------------------------------------------------------------------------
def test_a_run_larger_than_every_node_is_refused_before_any_work(capsys, ray_local, tmp_path):
    path = write_sweep(tmp_path, grid={"arch": ["topk"], "n_latents": [50_000_000], "k": [4]})
    rc, _, err = cli(capsys, "run", path, "--results", tmp_path / "results")
    line = one_line_error(err)
    assert rc == 2 and "n_latents 50000000" in line and "GiB" in line and "resources.shards" in line, line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    code = ("import os, sys; os.umask(int(sys.argv[2], 8)); from pathlib import Path; "
            "from sae_core.io import write_text_atomic; write_text_atomic(Path(sys.argv[1]), 'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt"), oct(umask)[2:]], cwd=REPO, check=True)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode


# --- one line, never a traceback --------------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    import orchestrator.status as status

    def bug(*_):
        raise KeyError("boom")

    monkeypatch.setattr(status, "sweep_status", bug)
    rc, _, err = cli(capsys, "status", tmp_path)
    assert rc == 1 and "internal error: KeyError" in one_line_error(err) and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "status", str(tmp_path)])


def test_storage_errors_are_one_line_with_what_to_do(capsys, monkeypatch, tmp_path):
    import analysis.sweep_fits as sweep_fits

    def read_only(*_, **__):
        raise OSError(30, "Read-only file system", "/results/t/fits/fits.json")

    monkeypatch.setattr(sweep_fits, "fit_sweep", lambda *_: ({}, {}))
    monkeypatch.setattr(sweep_fits, "write_fits", read_only)
    rc, _, err = cli(capsys, "fit", tmp_path)
    line = one_line_error(err)
    assert rc == 2 and "/results/t/fits/fits.json: Read-only file system" in line and "--out" in line


def test_failure_reasons_print_as_text(capsys, copy):
    _, _, sweep_dir = copy
    row_file = next((sweep_dir / "runs").glob("*.parquet"))
    from orchestrator.store import RUN_SCHEMA, read_parquet, write_parquet_atomic

    row = read_parquet(row_file).to_pylist()[0]
    write_parquet_atomic(row_file, [{**row, "status": "failed", "error": "Traceback...\nValueError: bad thing"}],
                         RUN_SCHEMA)
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert f"{row_file.stem} failed: ValueError: bad thing" in out and "['" not in out, out


def test_status_and_the_dry_run_read_each_run_alike(capsys, copy):
    """One derivation serves both: a failed row, a run whose lock a live process holds, and one never trained."""
    path, results, sweep_dir = copy
    from orchestrator.store import RUN_SCHEMA, read_parquet, write_parquet_atomic

    failed, pending = sorted(p.stem for p in (sweep_dir / "runs").glob("*.parquet"))
    row_file = sweep_dir / "runs" / f"{failed}.parquet"
    row = read_parquet(row_file).to_pylist()[0]
    write_parquet_atomic(row_file, [{**row, "status": "failed", "error": "ValueError: bad thing"}], RUN_SCHEMA)
    (sweep_dir / "runs" / f"{pending}.parquet").unlink()

    def dry_run_states() -> dict[str, str]:
        rc, out, _ = cli(capsys, "run", path, "--dry-run", "--results", results)
        assert rc == 0, out
        return {line.split()[0]: line.split("  ")[-1] for line in out.splitlines() if line[:16].strip() in
                (failed, pending)}

    with ResultsStore.at(sweep_dir).lock(pending) as mine:
        assert mine
        rc, out, _ = cli(capsys, "status", sweep_dir)
        assert "0 ok" in out and "1 running" in out and "1 failed" in out and "0 pending" in out, out
        assert dry_run_states() == {failed: "failed: ValueError: bad thing", pending: "running"}
    rc, out, _ = cli(capsys, "status", sweep_dir)
    assert "0 running" in out and "1 pending" in out, out
    states = dry_run_states()
    assert states[failed] == "failed: ValueError: bad thing" and states[pending].startswith("pending: "), states


# --- submit ---------------------------------------------------------------------------------------------------------
def test_submit_stages_no_dotfiles(tmp_path):
    root = tmp_path / "repo"
    for pkg in ("sae_core", "orchestrator", "analysis"):
        (root / pkg / "sub").mkdir(parents=True)
        (root / pkg / "mod.py").write_text("")
        (root / pkg / ".mod.py.swp").write_text("")
        (root / pkg / "sub" / ".DS_Store").write_text("")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: s")
    staged = tmp_path / "staged"
    stage(sweep_file, staged, root)
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == ["analysis/mod.py", "orchestrator/mod.py", "sae_core/mod.py", "sweep.yaml"]


class _HeadStartingUp:
    """The Jobs client of a head whose job agent comes up after `refusals` submissions (the real client's
    message); a cluster in that state cannot be produced on demand."""

    def __init__(self, refusals: int):
        self.refusals = refusals

    def submit_job(self, **_):
        if self.refusals:
            self.refusals -= 1
            raise RuntimeError("Request failed with status code 503: No available agent to submit job, "
                               "please try again later.")
        return "raysubmit_1"


def test_submit_waits_for_the_job_agent_then_names_the_problem():
    assert _submit_job(_HeadStartingUp(2), "http://h:8265", wait_s=10) == "raysubmit_1"
    with pytest.raises(ConfigError, match="did not take the job after waiting 0 s for its job agent"):
        _submit_job(_HeadStartingUp(100), "http://h:8265", wait_s=0)


def test_the_progress_rate_after_a_resume_counts_only_new_tokens(tmp_path):
    import time
    from types import SimpleNamespace

    from orchestrator.plan import RunPlan
    from orchestrator.scheduler import Progress

    store = ResultsStore(tmp_path, "t")
    run = RunPlan("r1", "topk", None, {}, {"n_latents": 8}, {"train_tokens": 10_000}, "s")
    store.write_progress("r1", 4_000, 10_000, time.time())  # trained before the interruption
    lines: list[str] = []
    progress = Progress(SimpleNamespace(store=store), [run], lines.append)
    progress.t0 -= 10.0
    store.write_progress("r1", 4_500, 10_000, time.time())
    progress.show({}, running=1, force=True)
    assert "| 50 tokens/s |" in lines[-1] and "ETA 110 s" in lines[-1], lines
