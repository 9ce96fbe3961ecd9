"""The results store of one sweep (layout in docs/results.md), written so that a crash never leaves a half file:

  results/<sweep>/sweep.yaml                 the spec as given
  runs/<run_id>.parquet                      one row per finished run (ok, diverged or failed), written last
  curves/ layers/ recovery/<run_id>.parquet  training curve, per-layer metrics, progressive recovery
  saes/<run_id>/                             weights, config, latent stats, trainer checkpoint
  progress/<run_id>.json                     tokens done, for the driver's progress line
  locks/<run_id>.lock                        held while a process trains the run

Every file is written to a temporary name and renamed. A run counts as done when its row says ok or
diverged; a failed row is retried by the next `run`.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sae_core.io import write_atomic, write_json_atomic, write_text_atomic

DONE = ("ok", "diverged")

# Types of the runs table's fixed columns, so a column that is null in one run is still typed.
RUN_SCHEMA = {
    "run_id": pa.string(), "sweep": pa.string(), "status": pa.string(), "error": pa.string(),
    "arch": pa.string(), "n_latents": pa.int64(), "expansion_factor": pa.float64(), "k": pa.int64(),
    "lr": pa.float64(), "l1_coeff": pa.float64(), "seed": pa.int64(), "model": pa.string(), "hook": pa.string(),
    "layer": pa.int64(), "layers": pa.string(), "d_in": pa.int64(), "batch_size": pa.int64(), "tokens": pa.int64(),
    "steps": pa.int64(), "flops": pa.float64(), "wall_seconds": pa.float64(), "device": pa.string(),
    "nmse": pa.float64(), "mse": pa.float64(), "nmse_pooled": pa.float64(), "mse_pooled": pa.float64(),
    "l0": pa.float64(), "l1": pa.float64(), "dead_frac": pa.float64(),
    "dead_frac_eval": pa.float64(), "ema_used": pa.bool_(), "downstream_metric": pa.string(),
    "downstream_loss": pa.float64(), "downstream_kl": pa.float64(), "downstream_zero_ablation": pa.float64(),
    "downstream_mean_ablation": pa.float64(), "ce_orig": pa.float64(), "ce_sae": pa.float64(),
    "ce_zero_ablation": pa.float64(), "ce_mean_ablation": pa.float64(), "ce_loss_score": pa.float64(),
    "downstream_tokens": pa.int64(), "downstream_null_reason": pa.string(),
    "config_json": pa.string(), "started_at": pa.timestamp("us", tz="UTC"), "finished_at": pa.timestamp("us", tz="UTC"),
}
TABLES = ("runs", "curves", "layers", "recovery")


def write_parquet_atomic(path: Path, rows: list[dict], schema: dict | None = None) -> None:
    """rows -> one Parquet file; columns in `schema` get its types, the others are inferred."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or list(schema or {})
    fields = []
    for name in columns:
        values = [row.get(name) for row in rows]
        typ = (schema or {}).get(name) or pa.array(values).type
        fields.append(pa.field(name, pa.float64() if pa.types.is_null(typ) else typ))
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on fd if no other process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (several nodes can share a host), or None outside Ray."""
    ray = sys.modules.get("ray")  # never import Ray just for this
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # a half-started or shutting-down Ray: the id is informative only
        return None


class ResultsStore:
    def __init__(self, root: str | Path, sweep: str):
        self.dir = Path(root).expanduser().resolve() / sweep
        self.sweep = sweep

    def path(self, table: str, run_id: str) -> Path:
        return self.dir / table / f"{run_id}.parquet"

    def sae_dir(self, run_id: str) -> Path:
        return self.dir / "saes" / run_id

    def save_spec(self, text: str) -> None:
        write_text_atomic(self.dir / "sweep.yaml", text)

    def save_plan(self, runs: list[dict]) -> None:
        """The planned runs (run_id, arch, layer, axes), for `status` to count what is pending."""
        write_json_atomic(self.dir / "plan.json", runs)

    def plan(self) -> list[dict]:
        path = self.dir / "plan.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def running(self) -> set[str]:
        """Runs whose lock some live process holds."""
        held = set()
        for path in (self.dir / "locks").glob("*.lock"):
            fd = os.open(path, os.O_RDWR)
            try:
                if not _try_lock(fd):
                    held.add(path.stem)
            finally:
                os.close(fd)
        return held

    # --- run rows ------------------------------------------------------------------------------
    def rows(self) -> dict[str, dict]:
        """run_id -> its runs-table row, for every finished run (partial files are never read: they are
        written under a temporary name)."""
        out = {}
        for path in sorted((self.dir / "runs").glob("*.parquet")):
            table = pq.read_table(path)
            if table.num_rows:
                out[path.stem] = table.to_pylist()[0]
        return out

    def done(self) -> set[str]:
        return {rid for rid, row in self.rows().items() if row["status"] in DONE}

    def write_run(self, row: dict, curve: list[dict] = (), layers: list[dict] = (), recovery: list[dict] = ()) -> None:
        """The run's tables first, its row last: a row on disk means everything else is there too."""
        rid = row["run_id"]
        for table, rows in (("curves", curve), ("layers", layers), ("recovery", recovery)):
            if rows:
                write_parquet_atomic(self.path(table, rid), [{"run_id": rid, **r} for r in rows])
        write_parquet_atomic(self.path("runs", rid), [row], RUN_SCHEMA)

    # --- coordination between processes ------------------------------------------------------------
    @contextmanager
    def lock(self, run_id: str, wait_s: float = 0.0):
        """Yields True if this process now owns the run (held until the block ends), False if another still
        does after wait_s seconds. flock is released by the kernel when a process dies, so a crashed owner
        never blocks a resume; the wait covers a retried pack that starts while its dying predecessor (e.g.
        on a node being torn down) still holds the lock."""
        path = self.dir / "locks" / f"{run_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.time() + wait_s
        try:
            while not _try_lock(fd):
                if time.time() >= deadline:
                    yield False
                    return
                time.sleep(0.2)
            yield True
        finally:
            os.close(fd)

    def write_progress(self, run_id: str, tokens: int, total: int, started: float) -> None:
        write_json_atomic(self.dir / "progress" / f"{run_id}.json",
                          {"tokens": tokens, "total": total, "started": started, "updated": time.time(),
                           "pid": os.getpid(), "host": socket.gethostname(), "node": _ray_node_id()})

    def progress(self) -> dict[str, dict]:
        out = {}
        for path in (self.dir / "progress").glob("*.json"):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced while reading
                continue
        return out
