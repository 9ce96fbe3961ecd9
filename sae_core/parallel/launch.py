"""Starting the processes of one sharded run: torch.distributed over TCP (NCCL on GPUs, gloo on CPU), and
a local launcher that runs a group of processes on this machine (tests, bench/scaling.py). On a cluster the
Ray scheduler starts the group instead (orchestrator/multiprocess_run.py) and calls the same `init_distributed`."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 600  # a rank waiting on a dead peer gives up after this (the launcher kills it sooner)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world: int, address: str, port: int, device: torch.device,
                     timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{address}:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _child(rank: int, world: int, port: int, target: Callable, args: tuple, threads: int, out) -> None:
    torch.set_num_threads(threads)
    try:
        # by value: a tensor put on the queue as it is travels as a file descriptor that the parent fetches
        # from this process, which may have exited by then (FileNotFoundError under load)
        out.put((rank, True, pickle.dumps(target(rank, world, port, *args))))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_local_group(target: Callable, world: int, args: tuple = (), threads: int = 1):
    """Start `world` processes running target(rank, world, port, *args); returns (processes, result queue)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, target, args, threads, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs, out


def run_local_group(target: Callable, world: int, args: tuple = (), threads: int = 1,
                    timeout_s: float = 600) -> list[Any]:
    """Run target(rank, world, port, *args) in `world` local processes; their results by rank. A failure on
    any rank raises with its traceback, after the others are stopped."""
    procs, out = start_local_group(target, world, args, threads)
    results: dict[int, Any] = {}
    errors = []
    try:
        while len(results) + len(errors) < world:
            try:
                rank, ok, value = out.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"local group: no result within {timeout_s} s") from None
            if ok:
                results[rank] = pickle.loads(value)  # our own child's bytes, never a file
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others are blocked in a collective with the failed rank
    finally:
        for p in procs:
            if p.is_alive() and errors:
                p.kill()
            p.join(timeout=30)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def train_local(rank: int, world: int, port: int, shards: int, sae_cfg: dict, train_cfg: dict, source,
                out_dir: str | None = None, max_steps: int | None = None) -> dict:
    """Train one run as rank `rank` of a local S x R group: what `run_local_group` runs in tests and benchmarks.
    Returns the run's status, steps, metrics and curve, and on rank 0 the whole SAE's weights."""
    from sae_core.parallel.mesh import build_mesh
    from sae_core.trainer import Trainer

    init_distributed(rank, world, "127.0.0.1", port, torch.device("cpu"))
    mesh = build_mesh(shards, world // shards)
    result = Trainer(sae_cfg, {**train_cfg, "device": "cpu"}, source, out_dir, mesh=mesh).run(max_steps)
    return {"status": result.status, "steps": result.steps, "tokens": result.tokens, "flops": result.flops,
            "metrics": result.metrics, "curve": result.curve, "wall_seconds": result.wall_seconds,
            "weights": None if result.sae is None else {k: v.cpu() for k, v in result.sae.net.state_dict().items()},
            "pid": os.getpid()}
