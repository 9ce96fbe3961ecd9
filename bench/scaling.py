#!/usr/bin/env python
"""Sharded and data-parallel training: measured throughput here, and the communication on paper at the
paper's scale.

Measured (default): the trainer's own step (Trainer.start().step, whole recipe) of one TopK SAE on
  S=1   one process with all the threads
  S=2   two processes (gloo over loopback), the latents split in two, one thread each
  R=2   two processes, each half of every batch, one thread each
in one run, interleaved, on the same batches; s/step is the slowest rank's mean over the timed steps.
The threads are split so each layout uses the whole machine: the ratio to S=1 is the cost of the split.

On paper (--paper): bytes each rank sends per step, and the time they take against the encoder matmul's,
for S shards at n = 2^24, d = 4096 (capacity factor 2), under stated bandwidths (override with flags).

Usage: .venv/bin/python bench/scaling.py [--configs 768x24576 768x98304] [--steps 4] [--reps 2] [--paper]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from sae_core.parallel.launch import init_distributed, run_local_group
from sae_core.parallel.mesh import Mesh, build_mesh
from sae_core.sources.base import ActivationSource
from sae_core.trainer import Trainer

K, BATCH = 32, 4096


class GaussianBatches(ActivationSource):
    """Seeded Gaussian batches: each process makes the same ones without reading anything."""

    def __init__(self, d_in: int):
        self.d_in = d_in

    def train_batch(self, step, batch_size):
        return torch.randn(batch_size, self.d_in, generator=torch.Generator().manual_seed(step))

    def eval_set(self):
        return self.train_batch(10**6, 256)


def _time_steps(rank, world, port, shards, d, n, warmup, steps, threads):
    torch.set_num_threads(threads)
    mesh = Mesh()
    if world > 1:
        init_distributed(rank, world, "127.0.0.1", port, torch.device("cpu"))
        mesh = build_mesh(shards, world // shards)
    source = GaussianBatches(d)
    session = Trainer({"arch": "topk", "d_in": d, "n_latents": n, "k": K},
                      {"train_tokens": BATCH * (warmup + steps), "batch_size": BATCH, "init_samples": 4096,
                       "device": "cpu"}, source, mesh=mesh).start()
    for s in range(warmup):
        session.step(source.train_batch(s, BATCH))
    mesh.barrier()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        session.step(source.train_batch(s, BATCH))
    mesh.barrier()
    return (time.perf_counter() - t0) / steps


LAYOUTS = {"S=1": (1, 1), "S=2": (2, 2), "R=2": (1, 2)}  # (shards, processes)


def measure(d: int, n: int, warmup: int, steps: int, reps: int, threads: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(reps):  # interleaved: drift on this shared machine hits every layout alike
        for name, (shards, world) in LAYOUTS.items():
            per = max(1, threads // world)
            if world == 1:
                times[name].append(_time_steps(0, 1, 0, 1, d, n, warmup, steps, per))
            else:
                out = run_local_group(_time_steps, world, (shards, d, n, warmup, steps, per), threads=per)
                times[name].append(max(out))
    return {name: min(ts) for name, ts in times.items()}


def bytes_per_step(n: int, d: int, k: int, k_aux: int, batch: int, shards: int, replicas: int, capacity: float,
                   value_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per step with ring collectives (all-reduce 2(P-1)/P of the buffer, all-gather
    (P-1) times its own part): the shard collectives (AuxK's only while latents are dead: k_aux = 0 turns
    them off) and the replicas' gradient all-reduce (densified: replicas' rows differ)."""
    S, R = shards, replicas
    m, m_aux = min(k, math.ceil(capacity * k / S)), min(k_aux, math.ceil(capacity * k_aux / S))
    ring = 2 * (S - 1) / S
    return {
        "top-k all-gather": (S - 1) * batch * (m + m_aux) * value_bytes,
        "decoder all-reduce (fwd)": ring * batch * d * value_bytes,
        "AuxK decoder all-reduce (fwd)": ring * batch * d * value_bytes if k_aux else 0.0,
        "encoder input all-reduce (bwd)": ring * batch * d * value_bytes,
        "replica gradients": 2 * (R - 1) / R * (2 * n // S * d + n // S + d) * 4,
    }


def paper_table(args) -> None:
    n, d, k, B = 2**24, 4096, args.k, args.batch
    k_aux = 2 ** round(math.log2(d / 2))
    print(f"\nOn paper: n = 2^24, d = {d}, k = {k}, k_aux = {k_aux}, capacity factor 2, {B:,} vectors per replica "
          f"per step, fp32 values, ring collectives; encoder matmul at {args.flops / 1e12:.0f} TFLOP/s per GPU, "
          f"links {args.nvlink:.0f} GB/s within a node of 8 (NVLink), {args.ib:.0f} GB/s across nodes (IB).")
    print(f"{'S':>4} {'rows/shard':>10} {'top-k gather':>13} {'3 B x d all-reduces':>20} {'total GB':>9} "
          f"{'comm s':>8} {'matmul s':>9} {'comm/matmul':>12}")
    for S in (8, 64, 512):
        v = bytes_per_step(n, d, k, k_aux, B, S, 1, 2.0)
        dense = sum(val for key, val in v.items() if "all-reduce" in key)
        total = dense + v["top-k all-gather"]
        bw = (args.nvlink if S <= 8 else args.ib) * 1e9
        comm = total / bw
        matmul = 2 * B * (n // S) * d / args.flops
        print(f"{S:>4} {n // S:>10,} {v['top-k all-gather'] / 1e9:>12.3f}G {dense / 1e9:>19.2f}G {total / 1e9:>9.2f} "
              f"{comm:>8.3f} {matmul:>9.3f} {comm / matmul:>12.2f}")
    breakeven = n * args.ib * 1e9 / (12 * args.flops)  # 2 B (n/S) d / F = 3 x 2 x B d x 4 bytes / BW
    v = bytes_per_step(n, d, k, k_aux, B, 512, 1, 2.0)
    print(f"Per rank the shard traffic is ~3 all-reduces of B x d fp32 whatever S is, while the matmul shrinks as "
          f"1/S: across nodes they cross at S = n BW / (12 F) = {breakeven:.0f}. The top-k all-gather (capacity x "
          f"(k + k_aux) values per row) is {v['top-k all-gather'] / sum(v.values()) * 100:.1f}% of the traffic at "
          "S = 512: the B x d all-reduces are what stop sharding paying.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=["768x24576"], help="d_in x n_latents")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--paper", action="store_true", help="only the on-paper table")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=131072, help="vectors per replica per step (paper: 131072)")
    ap.add_argument("--flops", type=float, default=495e12, help="encoder matmul FLOP/s per GPU (H100 bf16 at 50%%)")
    ap.add_argument("--nvlink", type=float, default=450, help="GB/s per GPU within a node")
    ap.add_argument("--ib", type=float, default=50, help="GB/s per GPU across nodes (400 Gb/s NDR)")
    args = ap.parse_args()
    if not args.paper:
        print(f"TopK k={K}, batch {BATCH}, {args.threads} threads in all; best of {args.reps} interleaved repeats "
              f"of {args.steps} steps")
        print(f"{'config':>12} {'layout':>6} {'processes':>9} {'s/step':>8} {'vectors/s':>10} {'time / S=1':>10} "
              f"{'MB sent/rank/step':>18}")
        for cfg in args.configs:
            d, n = map(int, cfg.split("x"))
            t = measure(d, n, args.warmup, args.steps, args.reps, args.threads)
            for name, (shards, world) in LAYOUTS.items():
                # no latent is dead in a few steps, so AuxK sends nothing here
                sent = sum(bytes_per_step(n, d, K, 0, BATCH // (world // shards), shards, world // shards,
                                          2.0).values())
                print(f"{cfg:>12} {name:>6} {world:>9} {t[name]:>8.3f} {BATCH / t[name]:>10,.0f} "
                      f"{t[name] / t['S=1']:>10.2f} {sent / 1e6:>18.1f}")
    paper_table(args)


if __name__ == "__main__":
    main()
