#!/usr/bin/env python
"""torch.topk against kernels/topk_select.row_topk (grouped two-pass selection, the same values) per row of a
[B, n] fp32 matrix, interleaved in one run. The matrix is random normal plus a per-column offset (latents
differ in their mean pre-activation, as a trained encoder's do); the time does not depend on the values.

Usage: .venv/bin/python bench/topk_rows.py [--shapes 4096x24576,4096x98304,1024x24576] [--m 32,64]
       [--reps 5] [--threads 2] [--isa avx2]
"""
from __future__ import annotations

import argparse

import torch
from timing import best_of  # bench/timing.py

from sae_core.kernels.topk_select import row_topk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x24576,4096x98304,1024x24576")
    ap.add_argument("--m", default="32,64", help="entries kept per row (k; 2k: BatchTopK's candidates)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=["avx2"], help="measure the AVX2 CPU kind on this CPU (bench/machine.py)")
    args = ap.parse_args()
    from machine import cap_isa, describe

    cap_isa(args.isa)
    torch.set_num_threads(args.threads)
    print(describe() + "\n")
    print("| B x n | m | torch.topk s | row_topk s | speed-up |\n|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        B, n = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        t = torch.randn(B, n, generator=g) + 0.3 * torch.randn(1, n, generator=g)
        for m in map(int, args.m.split(",")):
            plain = grouped = float("inf")
            for _ in range(2):  # interleaved
                plain = min(plain, best_of(lambda t=t, m=m: t.topk(m, dim=-1, sorted=False), args.reps))
                grouped = min(grouped, best_of(lambda t=t, m=m: row_topk(t, m), args.reps))
            print(f"| {B} x {n} | {m} | {plain:.4f} | {grouped:.4f} | {plain / grouped:.2f}x |")


if __name__ == "__main__":
    main()
