#!/usr/bin/env python
"""Orchestration costs, side by side in one run.

1. Scheduling overhead per run: 32 tiny synthetic runs (one step each) through `run_sweep` on an
   embedded local Ray (its start timed apart), one run per task, against the same 32 runs trained in-process by `train_pack`
   one after another. overhead/run = (Ray wall - in-process wall) / 32.
2. Shared activation streams: 8 TopK SAEs on activations computed on the fly from a real transformer (the
   embedded MiniLM, cache off, so the model forward dominates), trained as one pack from one stream
   against the same 8 trained as 8 separate packs (each computing its own forward passes). Same process,
   same threads, evaluation off; throughput = SAE training tokens per second.

Usage: .venv/bin/python bench/orchestration.py [--tokens 16384] [--runs 8] [--tiny 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from orchestrator.plan import plan_sweep  # noqa: E402
from orchestrator.scheduler import connect, run_sweep  # noqa: E402
from orchestrator.worker import train_pack  # noqa: E402


def write(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tiny_spec(name: str, n_runs: int) -> dict:
    return {"name": name, "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                                   "train_tokens": 256, "eval_tokens": 256},
            "grid": {"arch": ["topk"], "n_latents": [32], "k": [4], "seed": list(range(n_runs))},
            "train": {"batch_size": 256, "init_samples": 256}, "eval": {"recovery": False},
            "resources": {"cpus": 1}, "pack_size": 1}


def scheduling(folder: Path, n_runs: int) -> tuple[float, float]:
    spec = write(folder, "tiny", tiny_spec("tiny", n_runs))
    sweep = plan_sweep(spec, folder / "inproc")
    data = sweep.spec.model_dump(mode="json", exclude_unset=True)
    t0 = time.perf_counter()
    for run in sweep.runs:
        train_pack(data, [asdict(run)], str(folder / "inproc"))
    inproc = time.perf_counter() - t0
    t0 = time.perf_counter()
    connect(None)
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    rc = run_sweep(spec, folder / "ray", echo=lambda s: None)
    ray_wall = time.perf_counter() - t0
    assert rc == 0
    return inproc, start, ray_wall


def pack_vs_separate(folder: Path, n_runs: int, tokens: int) -> tuple[float, float, int]:
    spec = {"name": "pack", "model": "embedded", "hook": {"site": "resid_post_ln", "layers": [2]},
            "data": {"text": {"embedded": True}, "cache": False, "context_length": 64, "train_tokens": tokens,
                     "eval_tokens": 1024, "batch_rows": 32},
            "grid": {"arch": ["topk"], "n_latents": [1536], "k": [16, 32], "seed": list(range(n_runs // 2))},
            "train": {"batch_size": 1024, "init_samples": 1024, "curve_points_per_decade": 1},
            "eval": {"downstream": False, "recovery": False}, "pack_size": n_runs}
    path = write(folder, "pack", spec)
    sweep = plan_sweep(path, folder / "pack-results")
    spec, data = sweep.of(sweep.runs[0])
    data.prepare()
    spec_data = spec.model_dump(mode="json", exclude_unset=True)
    runs = [asdict(r) for r in sweep.runs]
    train_pack(spec_data, runs[:1], str(folder / "warmup"))  # token rows, model load, first-call costs
    t0 = time.perf_counter()
    for run in runs:
        train_pack(spec_data, [run], str(folder / "separate"))
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_pack(spec_data, runs, str(folder / "packed"))
    packed = time.perf_counter() - t0
    return separate, packed, len(runs) * sweep.runs[0].train["train_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--tiny", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ.setdefault("SAE_SCALING_CACHE", str(folder / "cache"))
    try:
        inproc, ray_start, ray_wall = scheduling(folder, args.tiny)
        separate, packed, sae_tokens = pack_vs_separate(folder, args.runs, args.tokens)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n| {args.tiny} tiny runs | wall s | per run s |\n|---|---|---|")
    print(f"| in-process train_pack, sequential | {inproc:.2f} | {inproc / args.tiny:.3f} |")
    print(f"| embedded Ray start (once per sweep) | {ray_start:.2f} | |")
    print(f"| run_sweep on the running Ray, one task per run | {ray_wall:.2f} | {ray_wall / args.tiny:.3f} |")
    print(f"| scheduling overhead | | {(ray_wall - inproc) / args.tiny:.3f} |")
    print(f"\n| {args.runs} TopK SAEs on MiniLM layer 2, on the fly, {args.tokens:,} tokens each | wall s | "
          f"SAE tokens/s | speed-up |\n|---|---|---|---|")
    print(f"| separate runs (own forward each) | {separate:.1f} | {sae_tokens / separate:,.0f} | 1.00x |")
    print(f"| one pack, one shared stream | {packed:.1f} | {sae_tokens / packed:,.0f} | {separate / packed:.2f}x |")


if __name__ == "__main__":
    main()
