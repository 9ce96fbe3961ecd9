"""The results store of one sweep (layout in docs/results.md), written so that a crash never leaves a half file:

  results/<sweep>/sweep.yaml                 the spec as given
  runs/<run_id>.parquet                      one row per finished run (ok, diverged or failed), written last
  curves/ layers/ recovery/<run_id>.parquet  training curve, per-layer metrics, progressive recovery
  saes/<run_id>/                             weights, config, latent stats, trainer checkpoint
  progress/<run_id>.json                     tokens done, for the driver's progress line
  locks/<run_id>.lock                        held while a process trains the run
  plan.json                                  the runs the sweep now holds (only these count)
  broken/<table>/<file>.<time>               unreadable files, set aside by `run` (never deleted)

Every file is written to a temporary name and renamed. A run counts as done when its row says ok or
diverged; a failed row is retried by the next `run`, and so is a run any of whose files is unreadable.
Reading needs no write access: `status`, `results`, `fit --out` and `figures --out` work on read-only storage.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from sae_core.errors import DataError
from sae_core.evaluation.run import RUN_TABLES
from sae_core.io import write_atomic, write_json_atomic, write_text_atomic

DONE = ("ok", "diverged")
ENDED = (*DONE, "stopped")  # stopped: by a search at a rung (orchestrator/search.py); its row stays as it is
IMPORTED = "import-"  # run ids of SAEs added by `sae-scaling import`: never in a plan, always counted
SAE_WEIGHTS, SAE_CONFIG = "sae.safetensors", "config.json"

# Types of the runs table's fixed columns, so a column that is null in one run is still typed.
RUN_SCHEMA = {
    "run_id": pa.string(), "sweep": pa.string(), "status": pa.string(), "error": pa.string(),
    "arch": pa.string(), "n_latents": pa.int64(), "expansion_factor": pa.float64(), "k": pa.int64(),
    "lr": pa.float64(), "l1_coeff": pa.float64(), "seed": pa.int64(), "model": pa.string(), "hook": pa.string(),
    "layer": pa.int64(), "layers": pa.string(), "d_in": pa.int64(), "batch_size": pa.int64(), "tokens": pa.int64(),
    "steps": pa.int64(), "flops": pa.float64(), "wall_seconds": pa.float64(), "device": pa.string(),
    "nmse": pa.float64(), "mse": pa.float64(), "nmse_pooled": pa.float64(), "mse_pooled": pa.float64(),
    "l0": pa.float64(), "l1": pa.float64(), "dead_frac": pa.float64(),
    "dead_frac_eval": pa.float64(), "dense_frac": pa.float64(), "dense_top_density": pa.float64(),
    "refined_nmse": pa.float64(), "shrinkage": pa.float64(), "refinement_mean": pa.float64(),
    "layers_active_mean": pa.float64(), "single_layer_frac": pa.float64(),
    "ema_used": pa.bool_(), "downstream_metric": pa.string(),
    "downstream_loss": pa.float64(), "downstream_kl": pa.float64(), "downstream_zero_ablation": pa.float64(),
    "downstream_mean_ablation": pa.float64(), "ce_orig": pa.float64(), "ce_sae": pa.float64(),
    "ce_zero_ablation": pa.float64(), "ce_mean_ablation": pa.float64(), "ce_loss_score": pa.float64(),
    "downstream_tokens": pa.int64(), "downstream_null_reason": pa.string(),
    "probe_loss": pa.float64(), "probe_loss_baseline": pa.float64(),
    "ablation_sparsity": pa.float64(), "ablation_sparsity_se": pa.float64(),
    "ablation_sparsity_baseline": pa.float64(), "ablation_samples": pa.int64(),
    "config_json": pa.string(), "started_at": pa.timestamp("us", tz="UTC"), "finished_at": pa.timestamp("us", tz="UTC"),
}
# per-run tables besides runs/: the training curve, and every table the evaluation returns
# (sae_core.evaluation.run.RUN_TABLES), each <table>/<run_id>.parquet
# rungs: a searched run's held-out nmse at each rung it reached (orchestrator/search.py)
TABLES = ("runs", "curves", *RUN_TABLES, "rungs")
# Integer columns with nulls stay integers (pandas Int64)
_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


class BrokenFile(DataError):
    """A results file that cannot be read: truncated, overwritten with garbage, not what its name says."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: unreadable ({reason}); if run {path.stem} is in the sweep, `sae-scaling run "
                         "SWEEP.yaml` sets the file aside and trains the run anew; else delete the file")


def _first_line(err: Exception) -> str:
    """An error's gist: its first line, without pyarrow's repetition of the path the message already names."""
    text = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(err).strip())
    return text.splitlines()[0] if text else type(err).__name__


def read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except PermissionError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise BrokenFile(path, _first_line(err)) from None


def _read_row(path: Path) -> dict:
    table = read_parquet(path)
    if table.num_rows != 1 or not {"run_id", "status"} <= set(table.column_names):
        raise BrokenFile(path, f"{table.num_rows} rows, columns {', '.join(table.column_names[:5])}...; a run's "
                               "row file holds one row with run_id and status")
    return table.to_pylist()[0]


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"not JSON: {err}"
    return None


def _weights_problem(path: Path) -> str | None:
    """Why an SAE's weights file cannot be loaded (safetensors checks the header against the file's size)."""
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except PermissionError:
        raise
    except Exception as err:  # SafetensorError has no stable base class to catch
        return _first_line(err)
    return None


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


@dataclass(frozen=True)
class RunState:
    """One run as its files say: status is ok, diverged, stopped, failed, running, pending or broken (then
    problems lists its unreadable files and why, and row is None)."""

    status: str
    row: dict | None = None
    problems: tuple[tuple[Path, str], ...] = ()


class ResultsStore:
    def __init__(self, root: str | Path, sweep: str):
        self.dir = Path(root).expanduser().resolve() / sweep
        self.sweep = sweep

    @classmethod
    def at(cls, sweep_dir: str | Path) -> ResultsStore:
        """The store of an existing results folder (results/<sweep>)."""
        path = Path(sweep_dir).expanduser().resolve()
        if not (path / "sweep.yaml").is_file() and not (path / "runs").is_dir():
            raise DataError(f"{sweep_dir}: not a sweep's results folder (it holds sweep.yaml and runs/); "
                            "give results/<sweep name>")
        return cls(path.parent, path.name)

    def path(self, table: str, run_id: str) -> Path:
        return self.dir / table / f"{run_id}.parquet"

    def sae_dir(self, run_id: str) -> Path:
        return self.dir / "saes" / run_id

    def save_spec(self, text: str) -> None:
        self._save_if_changed(self.dir / "sweep.yaml", text)

    def save_plan(self, runs: list[dict]) -> None:
        """The planned runs (RunPlan.plan_entry): only their rows count in status, results, fits and figures, so
        a grid point removed from the sweep leaves its files on disk but out of the analysis."""
        self._save_if_changed(self.dir / "plan.json", json.dumps(runs, indent=2, sort_keys=True, default=str) + "\n")

    @staticmethod
    def _save_if_changed(path: Path, text: str) -> None:
        """Unchanged files are not rewritten, so a `run` with nothing to do works on read-only storage."""
        try:
            if path.read_text() == text:
                return
        except (OSError, UnicodeDecodeError):
            pass
        write_text_atomic(path, text)

    def search_history(self) -> dict[str, list[int]]:
        """A search's cells whose budget was raised after their search finished: cell -> the earlier budgets
        (orchestrator.search.schedule)."""
        path = self.dir / "search.json"
        if not path.is_file():
            return {}
        try:
            return {str(k): [int(b) for b in v] for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as err:
            raise BrokenFile(path, f"not a mapping of cells to budgets ({err})") from None

    def save_search_history(self, history: dict[str, list[int]]) -> None:
        self._save_if_changed(self.dir / "search.json", json.dumps(history, indent=1, sort_keys=True) + "\n")

    def plan(self) -> list[dict]:
        path = self.dir / "plan.json"
        if not path.is_file():
            return []
        try:
            plan = json.loads(path.read_text())
            if not isinstance(plan, list) or not all(isinstance(r, dict) and "run_id" in r for r in plan):
                raise ValueError("expected a list of runs, each with a run_id")
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a plan written by `sae-scaling run` ({err}); running the sweep again "
                            "rewrites it") from None
        return plan

    def counted(self, all_runs: bool = False) -> Callable[[str], bool]:
        """Which run ids count: the plan's (and imported SAEs'), or every one on disk when all_runs or when
        there is no plan yet."""
        planned = None if all_runs else {r["run_id"] for r in self.plan()} or None
        return lambda rid: planned is None or rid in planned or rid.startswith(IMPORTED)

    def running(self) -> set[str]:
        """Runs whose lock some live process holds. Read-only: flock needs no write access, so this works
        on storage mounted read-only."""
        held = set()
        for path in (self.dir / "locks").glob("*.lock"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:  # removed meanwhile, or not ours to read: nobody we can see holds it
                continue
            try:
                if not _try_lock(fd):
                    held.add(path.stem)
            finally:
                os.close(fd)
        return held

    # --- run rows and tables ------------------------------------------------------------------------
    def files(self, table: str, all_runs: bool = False) -> list[Path]:
        """The table's files of the runs that count (partial files are never listed: they are written under a
        temporary name)."""
        counted = self.counted(all_runs)
        return [p for p in sorted((self.dir / table).glob("*.parquet")) if counted(p.stem)]

    def table(self, table: str, all_runs: bool = False) -> pd.DataFrame:
        """All `<table>/<run_id>.parquet` files of the runs that count, as one DataFrame; a broken file raises
        BrokenFile."""
        files = self.files(table, all_runs)
        if not files:
            return pd.DataFrame()
        merged = pa.concat_tables([read_parquet(f) for f in files], promote_options="permissive")
        return merged.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def broken(self, run_ids) -> dict[str, list[tuple[Path, str]]]:
        """run_id -> its unreadable files (row, tables, SAE weights) with the reason, for the given runs that
        have a row."""
        out: dict[str, list[tuple[Path, str]]] = {}
        for rid in run_ids:
            if not self.path("runs", rid).is_file():
                continue
            problems = []
            for table in TABLES:
                path = self.path(table, rid)
                if path.is_file():
                    try:
                        _read_row(path) if table == "runs" else read_parquet(path)
                    except BrokenFile as err:
                        problems.append((path, err.reason))
            weights, config = self.sae_dir(rid) / SAE_WEIGHTS, self.sae_dir(rid) / SAE_CONFIG
            if weights.is_file() and (why := _weights_problem(weights)):
                problems.append((weights, why))
            if config.is_file() and (why := _json_problem(config)):
                problems.append((config, why))
            if problems:
                out[rid] = problems
        return out

    def set_aside(self, broken: dict[str, list[tuple[Path, str]]]) -> list[str]:
        """Moves each broken file, and its run's row, to broken/ so the run is trained again; one line each."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        lines = []
        for rid, problems in broken.items():
            paths = dict.fromkeys([p for p, _ in problems] + [self.path("runs", rid)])
            for path in paths:
                if not path.is_file():
                    continue
                dest = self.dir / "broken" / path.parent.name / f"{path.name}.{stamp}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
            reasons = "; ".join(f"{p.relative_to(self.dir)}: {why}" for p, why in problems)
            lines.append(f"run {rid}: unreadable files set aside in {self.dir / 'broken'} ({reasons}); training it "
                         "again")
        return lines

    def rows_of(self, run_ids) -> dict[str, dict]:
        """run_id -> row, for those of run_ids that have one."""
        paths = (self.path("runs", rid) for rid in run_ids)
        return {p.stem: _read_row(p) for p in paths if p.is_file()}

    def states(self, run_ids) -> dict[str, RunState]:
        """run_id -> what the store says of it, for `status` and a dry run alike. A live lock makes a run
        running even over an old row (a stopped or failed run being trained again); a finished row wins."""
        ids = list(run_ids)
        broken = self.broken(ids)
        rows = self.rows_of(rid for rid in ids if rid not in broken)
        running = self.running()
        out = {}
        for rid in ids:
            row = rows.get(rid)
            if rid in broken:
                out[rid] = RunState("broken", None, tuple(broken[rid]))
            elif row is not None and row["status"] in DONE:
                out[rid] = RunState(row["status"], row)
            elif rid in running:
                out[rid] = RunState("running", row)
            else:
                out[rid] = RunState(row["status"] if row is not None else "pending", row)
        return out

    def done(self, run_ids) -> set[str]:
        """Those of run_ids whose row says ok or diverged."""
        return {rid for rid, row in self.rows_of(run_ids).items() if row["status"] in DONE}

    def flops_spent(self, run_ids) -> float:
        """The training FLOPs the rows of run_ids record (a stopped run's up to where it stopped)."""
        return sum(float(row.get("flops") or 0) for row in self.rows_of(run_ids).values())

    def rungs(self, run_ids) -> dict[str, dict[int, dict]]:
        """run_id -> rung -> {tokens, nmse}, for those of run_ids that reached a rung of a search."""
        out = {}
        for rid in run_ids:
            path = self.path("rungs", rid)
            if path.is_file():
                out[rid] = {int(r["rung"]): r for r in read_parquet(path).to_pylist()}
        return out

    def curve(self, run_id: str) -> list[dict]:
        """The run's training curve rows ([] before it has one)."""
        path = self.path("curves", run_id)
        return read_parquet(path).to_pylist() if path.is_file() else []

    def add_rung(self, run_id: str, record: dict) -> None:
        """Record (or replace) the run's entry for record["rung"]."""
        rows = {**self.rungs([run_id]).get(run_id, {}), int(record["rung"]): {"run_id": run_id, **record}}
        write_parquet_atomic(self.path("rungs", run_id), [rows[k] for k in sorted(rows)])

    def ended(self, run_ids, rungs: dict[str, tuple[int, int]] | None = None) -> set[str]:
        """Those of run_ids with nothing left to train: done (ok or diverged), or, for the runs of a search's
        round (`rungs`: run_id -> (rung, tokens)), already at their target rung."""
        have = self.rungs(rungs or {})
        return self.done(run_ids) | {rid for rid, (rung, _) in (rungs or {}).items() if rung in have.get(rid, {})}

    def write_run(self, row: dict, curve: list[dict] = (), tables: dict[str, list[dict]] | None = None) -> None:
        """The run's tables first (its curve, and the evaluation's: table name -> rows), its row last: a row on
        disk means everything else is there too."""
        rid = row["run_id"]
        for table, rows in {"curves": curve, **(tables or {})}.items():
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
