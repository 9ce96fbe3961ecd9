#!/usr/bin/env python
"""Our TopK / ReLU training step against the peers' trainers (EleutherAI sparsify, SAELens), side by side.

The peers live in their own venv (bench/.venv, built on first use: torch pinned as in the Makefile, then
sae-lens and eai-sparsify under that constraint; never a project dependency). Each (config, trainer) is
timed in a fresh subprocess on the same synthetic activations (a random dictionary, generated from the
same seeds in every process), same thread count, Adam; trainers are interleaved and their order rotated
per repeat. Reported: best seconds per step, vectors/s, ratio to ours, the dense encoder matmul alone (the
floor a sparse step can approach, timed in our process), and each trainer's held-out nmse after the same
number of vectors, so speed is not bought with quality.

Usage: .venv/bin/python bench/peers.py [--configs topk-24k,topk-98k,relu-24k,topk-1m] [--reps 2]
       [--steps 4] [--warmup 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_VENV = HERE / ".venv"
PEER_PINS = ["sae-lens==6.54.12", "eai-sparsify==1.3.3"]
TORCH = "torch==2.13.0"

CONFIGS = {
    "topk-24k": dict(arch="topk", d=768, n=24576, k=32, batch=4096),
    "topk-98k": dict(arch="topk", d=768, n=98304, k=32, batch=4096),
    "relu-24k": dict(arch="relu", d=768, n=24576, k=None, batch=4096),
    "topk-1m": dict(arch="topk", d=768, n=2**20, k=32, batch=4096),
}
TRAINERS = {"topk": ["ours", "sparsify", "saelens"], "relu": ["ours", "saelens"]}
N_FEATURES, ACTIVE, N_EVAL = 16384, 32, 4096


# --- the data every process generates identically -----------------------------------------------------
def batch(d: int, n: int, seed: int):
    """n vectors: ACTIVE random features of a fixed random dictionary, exponential magnitudes, 1% noise."""
    import torch

    dictionary = torch.randn(N_FEATURES, d, generator=torch.Generator().manual_seed(1234))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N_FEATURES, (n, ACTIVE), generator=g)
    mag = torch.empty(n, ACTIVE).exponential_(generator=g)
    x = torch.einsum("na,nad->nd", mag, dictionary[idx])
    return x + 0.01 * torch.randn(x.shape, generator=g)


# --- trainers (each returns step(x) and reconstruct(x)) ------------------------------------------------------
def build_ours(cfg: dict, total: int):
    sys.path.insert(0, str(ROOT))
    from sae_core import Trainer
    from sae_core.sources.base import ActivationSource

    class Stream(ActivationSource):
        d_in = cfg["d"]

        def train_batch(self, step, batch_size):
            return batch(cfg["d"], batch_size, 10_000 + step)

        def eval_set(self):
            return batch(cfg["d"], N_EVAL, 1)

    sae = {"arch": cfg["arch"], "d_in": cfg["d"], "n_latents": cfg["n"]}
    if cfg["k"]:
        sae["k"] = cfg["k"]
    session = Trainer(sae, {"train_tokens": total, "batch_size": cfg["batch"], "init_samples": cfg["batch"],
                            "curve_points_per_decade": 1}, Stream()).start()
    return session.step, lambda x: session.sae.reconstruct(x)


def build_sparsify(cfg: dict, total: int):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(cfg["d"], SparseCoderConfig(num_latents=cfg["n"], k=cfg["k"]), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (cfg["n"] / 2**14) ** 0.5)
    first = [True]

    def step(x):
        if first[0]:  # sparsify's trainer centres the decoder bias on the first batch
            sae.b_dec.data = x.mean(0)
            first[0] = False
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step, lambda x: sae(x).sae_out


def build_saelens(cfg: dict, total: int):
    from sae_lens import SAETrainer, StandardTrainingSAE, TopKTrainingSAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    if cfg["arch"] == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg["d"], d_sae=cfg["n"], k=cfg["k"]))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=cfg["d"], d_sae=cfg["n"]))
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=total, train_batch_size_samples=cfg["batch"],
                                              lr_end=3e-4, device="cpu", logger=LoggingConfig(log_to_wandb=False)),
                         sae=sae, data_provider=iter(()))

    def step(x):
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, lambda x: sae.decode(sae.encode(x))


def worker(trainer: str, cfg: dict, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    total = (steps + warmup) * cfg["batch"]
    step, reconstruct = {"ours": build_ours, "sparsify": build_sparsify, "saelens": build_saelens}[trainer](cfg, total)
    times = []
    for i in range(warmup + steps):
        x = batch(cfg["d"], cfg["batch"], 10_000 + i)
        t0 = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        x = batch(cfg["d"], N_EVAL, 1)
        x_hat = reconstruct(x).float()
        nmse = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    out = {"s_per_step": min(times[warmup:]), "nmse": nmse}
    if trainer == "ours":  # the floor: the dense encoder matmul alone, same shapes, same process
        W = torch.randn(cfg["n"], cfg["d"])
        x = batch(cfg["d"], cfg["batch"], 5)
        floor = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ W.T
            floor.append(time.perf_counter() - t0)
        out["floor"] = min(floor)
    return out


# --- driver ---------------------------------------------------------------------------------------------------
def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pin = PEER_VENV / "torch-pin.txt"
        pin.write_text(TORCH + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(pin), *PEER_PINS], check=True)
        (PEER_VENV / ".installed").touch()
    return python


def run_one(python: Path, trainer: str, name: str, args) -> dict:
    cmd = [str(python), __file__, "--worker", trainer, "--configs", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="topk-24k,topk-98k,relu-24k")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, CONFIGS[args.configs], args.steps, args.warmup, args.threads)))
        return
    peers = ensure_peer_venv()
    print("| config | trainer | s/step | vectors/s | ours faster by | x floor | nmse |\n|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        trainers = TRAINERS[cfg["arch"]]
        best: dict[str, dict] = {}
        for rep in range(args.reps):
            order = trainers[rep % len(trainers):] + trainers[:rep % len(trainers)]
            for t in order:
                r = run_one(Path(sys.executable) if t == "ours" else peers, t, name, args)
                if "error" in r:
                    best.setdefault(t, r)
                elif t not in best or "error" in best[t] or r["s_per_step"] < best[t]["s_per_step"]:
                    best[t] = r
        floor = best.get("ours", {}).get("floor")
        ours = best.get("ours", {}).get("s_per_step")
        for t in trainers:
            r = best[t]
            if "error" in r:
                print(f"| {name} | {t} | failed: {r['error']} | | | | |")
                continue
            s = r["s_per_step"]
            print(f"| {name} | {t} | {s:.3f} | {cfg['batch'] / s:,.0f} | {s / ours:.2f}x | "
                  f"{s / floor:.2f} | {r['nmse']:.4f} |" if ours and floor else f"| {name} | {t} | {s:.3f} |")
        if floor:
            print(f"| {name} | encoder matmul alone | {floor:.3f} | {cfg['batch'] / floor:,.0f} | | 1.00 | |")


if __name__ == "__main__":
    main()
