#!/usr/bin/env python
"""Our TopK / ReLU training step against the peers' trainers (EleutherAI sparsify, SAELens), side by side.

The peers live in their own venv (bench/.venv, built on first use: torch pinned as in the Makefile, then
sae-lens and eai-sparsify under that constraint; never a project dependency). Each (config, trainer) runs
in a fresh subprocess on the same synthetic activations (a random dictionary, generated from the same seeds
in every process), same thread count, Adam at the same learning rate (the paper's rule, 2e-4 / sqrt(n / 2^14)).
Ours runs twice for TopK: "ours" with the default train.topk_select (auto: bf16 ranking with the winners
recomputed exactly, where the hardware has native bf16) and "ours-exact" (exact ranking).

Timing pass: trainers interleaved, their order rotated per repeat; best seconds per step, vectors/s, ratio
to ours, ratio to the dense encoder matmul (fp32 and bf16, timed in our process: the floor a sparse step
can approach) and each worker's peak resident memory.
Quality pass, after a config's timing: one more subprocess per trainer trains --quality-steps steps on the
same batches and reports held-out nmse, so speed is not bought with quality; a trainer whose timed steps put
that over --quality-budget-s is skipped. For ours it also reports the share of the exact top-k winners that
the bf16 ranking picks on the held-out vectors, and both encoder forwards' times.
A trainer whose estimated peak memory (working set included) exceeds MemAvailable is skipped before it starts.
Last, how s/step grows with n over the TopK configs measured. First, the machine (bench/machine.py: CPU
kind, torch build, fastest matmul dtype): a table holds for the CPU kind it was measured on only.

Usage: .venv/bin/python bench/peers.py [--configs topk-24k,topk-98k,relu-24k] [--reps 2] [--steps 4]
       [--warmup 2] [--threads 2] [--quality-steps 32] [--quality-budget-s 900] [--trainers ours,sparsify]
       [--isa avx2]   (the AVX2 CPU kind, emulated on a newer CPU: bench/machine.py)
       batch 1024: --configs topk-24k-b1k,topk-98k-b1k
       n = 2^20 is opt-in: --configs topk-1m --reps 1 --steps 1 --warmup 1 (ours: 1-2 min per step)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
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
    "gated-24k": dict(arch="gated", d=768, n=24576, k=None, batch=4096),
    "jumprelu-24k": dict(arch="jumprelu", d=768, n=24576, k=None, batch=4096),
    # the dense families at a trained SAE's code density (L0 ~ 49 of 24576), not at init's ~50%: each
    # trainer's activity bias (JumpReLU: threshold) shifted so that 0.2% of the first batch's entries pass
    **{f"{a}-24k-trained": dict(arch=a, d=768, n=24576, k=None, batch=4096, density=0.002)
       for a in ("relu", "gated", "jumprelu")},
    "topk-1m": dict(arch="topk", d=768, n=2**20, k=32, batch=4096),
    # batch 1024: the per-step costs that do not scale with the batch weigh 4x more
    "topk-24k-b1k": dict(arch="topk", d=768, n=24576, k=32, batch=1024),
    "topk-98k-b1k": dict(arch="topk", d=768, n=98304, k=32, batch=1024),
    # the GPU table (bench/gpu_check.sh): 2^15 to 2^20 latents at batch 4096 and 16384
    **{f"gpu-{n // 1024}k-b{b // 1024}k": dict(arch="topk", d=768, n=n, k=32, batch=b)
       for n in (2**15, 2**17, 2**20) for b in (4096, 16384)},
    # smoke checks of this script, not benchmarks
    "topk-tiny": dict(arch="topk", d=64, n=1024, k=8, batch=512),
    "relu-tiny": dict(arch="relu", d=64, n=1024, k=None, batch=512),
}
TRAINERS = {"topk": ["ours", "ours-exact", "sparsify", "saelens"],
            **{a: ["ours", "saelens"] for a in ("relu", "gated", "jumprelu")}}
GROWTH = ("topk-24k", "topk-98k", "topk-1m")  # same d, k and batch: s/step against n alone
N_FEATURES, ACTIVE, N_EVAL = 16384, 32, 4096
COLUMNS = 9
GiB = 2**30


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


def adam_lr(n: int) -> float:
    """The paper's rule (`lr: auto`); given to every trainer here so that quality differences are not
    learning-rate differences."""
    return 2e-4 / (n / 2**14) ** 0.5


def density_cut(values, density: float) -> float:
    """The value that about `density` of `values` exceed: what a family's activity bias is shifted by to give
    a trained code's density. A quantile of at most 4M of them, evenly strided (torch.quantile takes 16M)."""
    v = values.flatten()
    return float(v[:: max(1, v.numel() // 2**22)].float().quantile(1 - density))


# --- trainers (each returns step(x), reconstruct(x) and the model) -----------------------------------------
def build_ours(cfg: dict, total: int, variant: str, device: str, vectors=None, **train_overrides):
    """vectors: (n, seed) -> n vectors, numbered as batch()'s seeds (default: batch()); train_overrides:
    TrainConfig keys over these (init_samples is one batch here, to start timing runs quickly)."""
    vectors = vectors or (lambda n, seed: batch(cfg["d"], n, seed))
    sys.path.insert(0, str(ROOT))
    from sae_core import Trainer
    from sae_core.sources.base import ActivationSource

    class Stream(ActivationSource):
        d_in = cfg["d"]

        def train_batch(self, step, batch_size):
            return vectors(batch_size, 10_000 + step).to(device)

        def eval_set(self):
            return vectors(N_EVAL, 1).to(device)

    sae = {"arch": cfg["arch"], "d_in": cfg["d"], "n_latents": cfg["n"]}
    if cfg["k"]:
        sae["k"] = cfg["k"]
    train = {"train_tokens": total, "batch_size": cfg["batch"], "init_samples": cfg["batch"],
             "curve_points_per_decade": 1, "device": device, **train_overrides}
    if variant == "ours-exact":
        train["topk_select"] = "exact"
    session = Trainer(sae, train, Stream()).start()
    if cfg.get("density"):
        from train_step import set_density  # bench/train_step.py: the same shift, for our families

        set_density(session.sae.net, session.sae.normalize(batch(cfg["d"], cfg["batch"], 10_000))[0], cfg["density"])
    return session.step, lambda x: session.sae.reconstruct(x), session.sae


def build_sparsify(cfg: dict, total: int, device: str):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(cfg["d"], SparseCoderConfig(num_latents=cfg["n"], k=cfg["k"]), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=adam_lr(cfg["n"]))
    return sparsify_step(sae, opt), lambda x: sae(x).sae_out, sae


def sparsify_step(sae, opt):
    """One step of sparsify's trainer (trainer.py's fit loop, loss "fvu", no AuxK) with the optimizer `opt`."""
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

    return step


def build_saelens(cfg: dict, total: int, device: str):
    import sae_lens
    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    family = {"topk": "TopK", "relu": "Standard", "gated": "Gated", "jumprelu": "JumpReLU"}[cfg["arch"]]
    sae_cfg = getattr(sae_lens, f"{family}TrainingSAEConfig")(d_in=cfg["d"], d_sae=cfg["n"], device=device,
                                                            **({"k": cfg["k"]} if cfg["k"] else {}))
    sae = getattr(sae_lens, f"{family}TrainingSAE")(sae_cfg)
    if cfg.get("density"):  # the parameter that sets the family's activity, on SAELens's pre-activation
        with torch.no_grad():
            pre = sae.process_sae_in(batch(cfg["d"], cfg["batch"], 10_000).to(device)) @ sae.W_enc
            name = {"relu": "b_enc", "gated": "b_gate", "jumprelu": "b_enc"}[cfg["arch"]]
            pre += getattr(sae, name)
            q = density_cut(pre, cfg["density"])
            if cfg["arch"] == "jumprelu":
                sae.threshold.fill_(q)
            else:
                getattr(sae, name).sub_(q)
    lr = adam_lr(cfg["n"])
    # lr_end only matters to decaying schedules (this one is constant), but the trainer asserts it is set
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=total, train_batch_size_samples=cfg["batch"],
                                              lr=lr, lr_end=lr, device=device,
                                              logger=LoggingConfig(log_to_wandb=False)),
                         sae=sae, data_provider=iter(()))

    def step(x):
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, lambda x: sae.decode(sae.encode(x)), sae


def build(trainer: str, cfg: dict, total: int, device: str):
    if trainer.startswith("ours"):  # at the peers' lr (the paper's rule), not at its own default (lr: horizon)
        return build_ours(cfg, total, trainer, device, lr=adam_lr(cfg["n"]))
    return {"sparsify": build_sparsify, "saelens": build_saelens}[trainer](cfg, total, device)


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a timer measures it (a CPU runs each op before returning)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --- workers (one per subprocess) ---------------------------------------------------------------------------
def matmul_time(x, W) -> float:
    """Best of 3 of the dense encoder matmul x @ W.T in W's dtype, on W's device. Over latent chunks of at
    most 2^30 outputs: at n = 2^20 the whole B x n output (16 GiB in fp32) would not fit; one GEMM below."""
    chunk = max(1, GiB // x.shape[0])
    device = str(W.device)
    times = []
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        xc = x.to(W.device, W.dtype)
        for start in range(0, W.shape[0], chunk):
            xc @ W[start:start + chunk].T
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def encode_time(sae, x, k: int) -> float:
    """Best of 3 of our TopK encoder forward (the default ranking, `topk_select: auto`) on x, synchronised."""
    import torch

    from sae_core.kernels import topk_encode
    from sae_core.kernels.topk_select import resolve_selection

    device = str(x.device)
    arch, selection = sae.net, resolve_selection("auto", 2.0, x.device, x.shape[0])
    times = []
    with torch.no_grad():
        for _ in range(3):
            synchronize(device)
            t0 = time.perf_counter()
            topk_encode(sae.normalize(x)[0] - arch.b_pre, arch.W_enc, arch.b_enc, k, selection=selection)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return min(times)


def worker(trainer: str, cfg: dict, steps: int, warmup: int, threads: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, _, sae = build(trainer, cfg, (steps + warmup) * cfg["batch"], device)
    times = []
    for i in range(warmup + steps):
        x = batch(cfg["d"], cfg["batch"], 10_000 + i).to(device)
        synchronize(device)
        t0 = time.perf_counter()
        step(x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"s_per_step": min(times[warmup:]), "peak_gib": peak / GiB}
    if trainer == "ours":  # the floor, same shapes, same process
        x = batch(cfg["d"], cfg["batch"], 5).to(device)
        if cfg["arch"] == "topk":  # the encoder forward against the bf16 matmul it could at best be
            out["encode"] = encode_time(sae, x, cfg["k"])
        del step, sae  # at n = 2^20 the trainer's 18 GiB and the floor's operands do not fit together
        gc.collect()
        W = torch.randn(cfg["n"], cfg["d"], device=device)
        out["floor"] = matmul_time(x, W)
        out["floor_bf16"] = matmul_time(x, W.bfloat16())
    return out


def selection_overlap(sae, x, k: int) -> dict:
    """Share of the exact top-k (row, latent) pairs that the bf16 ranking (capacity 2) also picks, and the
    time of each encoder forward."""
    import torch

    from sae_core.kernels import EXACT, Selection, topk_encode

    arch = sae.net
    xc = sae.normalize(x)[0] - arch.b_pre
    chosen, seconds = {}, {}
    for name, selection in (("exact", EXACT), ("bf16", Selection(torch.bfloat16, 2.0))):
        t0 = time.perf_counter()
        chosen[name] = topk_encode(xc, arch.W_enc, arch.b_enc, k, selection=selection)[1]
        seconds[name] = time.perf_counter() - t0
    hits = (chosen["exact"].unsqueeze(2) == chosen["bf16"].unsqueeze(1)).any(2)
    return {"overlap": float(hits.float().mean()), "encode_exact": seconds["exact"], "encode_bf16": seconds["bf16"]}


def quality_worker(trainer: str, cfg: dict, steps: int, threads: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, reconstruct, sae = build(trainer, cfg, steps * cfg["batch"], device)
    for i in range(steps):
        step(batch(cfg["d"], cfg["batch"], 10_000 + i).to(device))
    x = batch(cfg["d"], N_EVAL, 1).to(device)
    with torch.no_grad():
        x_hat = reconstruct(x).float()
        out = {"nmse": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())}
        if trainer == "ours" and cfg["arch"] == "topk":
            out.update(selection_overlap(sae, x, cfg["k"]))
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


def needs_gib(trainer: str, cfg: dict) -> float:
    """Estimated peak memory in fp32: parameters, Adam's two moments, dense gradients and the B x n
    pre-activations (SAELens keeps a second B x n). Our TopK path streams the pre-activations in chunks and
    keeps row-sparse gradients: parameters and Adam plus 2 GiB of working set."""
    params = 2 * cfg["n"] * cfg["d"] * 4
    if trainer.startswith("ours") and cfg["arch"] == "topk":
        return (3 * params + 2 * GiB) / GiB
    acts = cfg["batch"] * cfg["n"] * 4 * (2 if trainer == "saelens" else 1)
    return (4 * params + acts) / GiB


def available_gib(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(device)[0] / GiB
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20


def run_one(python: Path, trainer: str, name: str, args, quality: bool = False) -> dict:
    cmd = [str(python), __file__, "--worker", trainer, "--configs", name, "--threads", str(args.threads),
           "--device", args.device]
    cmd += (["--quality", "--quality-steps", str(args.quality_steps)] if quality
            else ["--steps", str(args.steps), "--warmup", str(args.warmup)])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # killed for memory: no traceback, only the status
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(*cells: str) -> None:
    cells += ("",) * (COLUMNS - len(cells))
    print("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")


def quality_cells(q: dict) -> tuple[str, str]:
    """(nmse, bf16 overlap) of a quality-pass result."""
    if not q:  # no quality pass (--quality-steps 0)
        return "", ""
    if "nmse" in q:
        return f"{q['nmse']:.4f}", f"{q['overlap']:.2%}" if "overlap" in q else ""
    return q.get("skipped") or f"failed: {q['error']}", ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="topk-24k,topk-98k,relu-24k")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, default=32)
    ap.add_argument("--quality-budget-s", type=float, default=900)
    ap.add_argument("--worker")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU table (bench/gpu_check.sh)")
    ap.add_argument("--peer-python", help="the python that runs the peers (default: bench/.venv, built on first "
                                          "use); offline machines give one that has them")
    ap.add_argument("--trainers", help="a comma list: only these trainers (default: all of each config's)")
    ap.add_argument("--isa", choices=["avx2"], help="measure the AVX2 CPU kind on this CPU (bench/machine.py)")
    args = ap.parse_args()
    if args.worker:
        cfg = CONFIGS[args.configs]
        print(json.dumps(quality_worker(args.worker, cfg, args.quality_steps, args.threads, args.device)
                         if args.quality else worker(args.worker, cfg, args.steps, args.warmup, args.threads,
                                                     args.device)))
        return
    from machine import cap_isa, describe  # bench/machine.py: which CPU kind the table belongs to

    cap_isa(args.isa)  # before anything loads torch; the workers inherit the caps
    print(describe() + "\n")
    peers = Path(args.peer_python) if args.peer_python else ensure_peer_venv()
    names = args.configs.split(",")
    vectors = " / ".join(dict.fromkeys(f"{args.quality_steps * CONFIGS[n]['batch']:,}" for n in names))
    row("config", "trainer", "s/step", "vectors/s", "ours faster by", "x floor", "peak GiB",
        f"nmse after {vectors} vectors", "bf16 overlap")
    row(*["---"] * COLUMNS)
    notes, growth = [], {}
    for name in names:
        cfg = CONFIGS[name]
        trainers = [t for t in TRAINERS[cfg["arch"]] if not args.trainers or t in args.trainers.split(",")]
        free = available_gib(args.device)
        skip = {t: f"skipped: needs ~{need:.0f} GiB, {free:.0f} GiB available"
                for t in trainers if (need := needs_gib(t, cfg)) > free}
        best: dict[str, dict] = {}
        for rep in range(args.reps):
            order = trainers[rep % len(trainers):] + trainers[:rep % len(trainers)]
            for t in order:
                if t in skip:
                    continue
                r = run_one(Path(sys.executable) if t.startswith("ours") else peers, t, name, args)
                if "error" in r:
                    best.setdefault(t, r)
                elif t not in best or "error" in best[t] or r["s_per_step"] < best[t]["s_per_step"]:
                    best[t] = r
        quality = {}
        for t in trainers if args.quality_steps else []:
            if t in skip or "error" in best[t]:
                continue
            eta = best[t]["s_per_step"] * args.quality_steps
            quality[t] = ({"skipped": f"skipped (~{eta:.0f} s)"} if eta > args.quality_budget_s
                          else run_one(Path(sys.executable) if t.startswith("ours") else peers, t, name, args, True))
        floor = best.get("ours", {}).get("floor")
        ours = best.get("ours", {}).get("s_per_step")
        for t in trainers:
            if t in skip or "error" in best[t]:
                row(name, t, skip.get(t) or f"failed: {best[t]['error']}")
                continue
            s = best[t]["s_per_step"]
            row(name, t, f"{s:.3f}", f"{cfg['batch'] / s:,.0f}", f"{s / ours:.2f}x" if ours else "",
                f"{s / floor:.2f}" if floor else "", f"{best[t]['peak_gib']:.1f}", *quality_cells(quality.get(t, {})))
            if name in GROWTH:
                growth.setdefault(t, {})[cfg["n"]] = s
        if "encode" in best.get("ours", {}):
            enc, bf16 = best["ours"]["encode"], best["ours"]["floor_bf16"]
            notes.append(f"{name}: ours' TopK encoder forward {enc:.4f} s against the dense bf16 matmul's {bf16:.4f} s: "
                         f"{bf16 / enc:.0%} of the bf16 matmul rate")
        if floor:
            bf16 = best["ours"]["floor_bf16"]
            row(name, "encoder matmul fp32", f"{floor:.3f}", f"{cfg['batch'] / floor:,.0f}", "", "1.00")
            row(name, "encoder matmul bf16", f"{bf16:.3f}", f"{cfg['batch'] / bf16:,.0f}", "", f"{bf16 / floor:.2f}")
        q = quality.get("ours", {})
        if "overlap" in q:
            notes.append(f"{name}: ours' bf16 ranking picks {q['overlap']:.2%} of the exact top-{cfg['k']} on "
                         f"{N_EVAL:,} held-out vectors; its encoder forward takes {q['encode_bf16']:.3f} s against "
                         f"{q['encode_exact']:.3f} s exact (speed-up {q['encode_exact'] / q['encode_bf16']:.2f}x)")
    for t, points in growth.items():
        if len(points) >= 2:
            logs = [(math.log(n), math.log(s)) for n, s in points.items()]
            mx, my = sum(a for a, _ in logs) / len(logs), sum(b for _, b in logs) / len(logs)
            a = sum((x - mx) * (y - my) for x, y in logs) / sum((x - mx) ** 2 for x, _ in logs)
            notes.append(f"{t}: s/step grows as n^{a:.2f} (TopK, n = {', '.join(f'{n:,}' for n in points)})")
    if notes:
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    main()
