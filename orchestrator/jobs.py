"""`sae-scaling submit` and `logs`: a sweep as a Ray Job on a remote cluster.

The job's working directory is a staging copy of the three packages and the sweep file (shipped by Ray's
runtime environment); its entrypoint is `sae-scaling run` against the cluster (`--address auto`). The
cluster's Python must have the project's dependencies. The results root must be absolute and on storage
the cluster writes: a relative path would land in the job's temporary unpacked copy and be lost.
"""
from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.plan import plan_sweep
from sae_core.errors import ConfigError

PACKAGES = ("sae_core", "orchestrator", "analysis")
AGENT_WAIT_S = 30.0
_ROOT = Path(__file__).resolve().parent.parent


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: the Jobs API needs the dashboard URL, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, auth, version mismatch: all end the same way
        raise ConfigError(f"--address {address}: cannot reach the Ray Jobs API ({err})") from None


def submit(sweep: str | Path, address: str, results: str, python: str = "python") -> str:
    """python: the interpreter on the cluster that has the project's dependencies (torch, ray, ...)."""
    if not Path(results).is_absolute():
        raise ConfigError(f"--results {results}: must be an absolute path on storage the cluster writes; a "
                          "relative one would land in the job's temporary copy of the project")
    plan_sweep(sweep, results)  # every error found here, before anything is sent
    client = _client(address)
    staging = Path(tempfile.mkdtemp(prefix="sae-scaling-job-"))
    try:
        stage(sweep, staging)
        return _submit_job(client, address, entrypoint=f"{shlex.quote(python)} -m orchestrator.cli run sweep.yaml "
                                                       f"--address auto --results {shlex.quote(results)}",
                           runtime_env={"working_dir": str(staging)}, metadata={"sweep": Path(sweep).stem})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage(sweep: str | Path, staging: Path, root: Path = _ROOT) -> None:
    """The job's working directory: the packages (no caches; nothing the job needs starts with a dot, while
    editor swap files and .DS_Store do) and the sweep file."""
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, staging / pkg, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    shutil.copy(sweep, staging / "sweep.yaml")


def _submit_job(client, address: str, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """client.submit_job, waiting for a head that has just started: its job agent comes up seconds after the
    dashboard answers, and until then every submission is refused."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except Exception as err:  # the Jobs client raises RuntimeError, HTTP and connection errors alike
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if "No available agent" in str(err) and time.time() < deadline:
                time.sleep(2)
                continue
            waited = f" after waiting {wait_s:.0f} s for its job agent" if "No available agent" in str(err) else ""
            raise ConfigError(f"--address {address}: the cluster did not take the job{waited} ({message}); "
                              "check `ray status` on the head and submit again") from None


def follow_logs(job_id: str, address: str) -> int:
    from ray.job_submission import JobStatus

    client = _client(address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1)
