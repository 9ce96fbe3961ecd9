#!/usr/bin/env python
"""Vectors/s of one training step of every architecture, interleaved in one run on the same data:

  <arch>  the trainer's own step (Trainer.start().step) for that family, with the whole recipe (AuxK
          bookkeeping, decoder projection and renormalisation, Adam, dead-latent counters). For the
          TopK family: dense encoder matmul + top-k, everything after it on (idx, vals) [B, k].
  naive   TopK done the textbook way: scatter the top-k into a dense B x n code, dense decoder, dense
          autograd (six B x d x n matmuls per step); and ReLU + L1 the same way (the loop the L1 family
          must beat)
  floor   the dense encoder matmul alone, x W_enc^T + b_enc: what the paper says a TopK step can approach

Usage: .venv/bin/python bench/train_step.py [--configs 768x24576:all 768x98304:topk] [--steps 3] [--reps 3]
       [--density 0.002] [--isa avx2]
A config is d_in x n_latents : the architectures to time there ("all", or a comma list).
Prints a table; ratios are what to compare (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from peers import adam_lr, density_cut  # bench/peers.py

from sae_core import Trainer, architecture_names
from sae_core.kernels import dense_code
from sae_core.sources import SyntheticSource

ARCH_PARAMS = {"topk": {"k": 32}, "multi_topk": {"k": 32}, "batchtopk": {"k": 32}}


def naive_step_fn(d: int, n: int, k: int | None, lr: float):
    """The textbook loop in plain PyTorch: TopK (k given) scattered into a dense code, or ReLU with an L1
    penalty (k None); dense decoder, dense autograd, fused Adam, unit-norm decoder rows."""
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.clone(), "b_enc": torch.zeros(n), "W_dec": W_dec, "b_pre": torch.zeros(d)}
    params = {k_: torch.nn.Parameter(v) for k_, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr, eps=6.25e-10, fused=True)

    def step(x):
        p = params
        pre = (x - p["b_pre"]) @ p["W_enc"].T + p["b_enc"]
        if k is None:
            z = pre.relu()
        else:
            vals, idx = pre.topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        x_hat = z @ p["W_dec"] + p["b_pre"]
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if k is None:
            loss = loss + 5e-3 * z.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, G = p["W_dec"], p["W_dec"].grad
            G.sub_((G * W).sum(1, keepdim=True) * W)
        opt.step()
        with torch.no_grad():
            p["W_dec"].div_(p["W_dec"].norm(dim=1, keepdim=True))
    return step


# what sets each dense family's activity, and the tensor it thresholds: shifted, it gives a trained code's density
ACTIVITY = {"relu": ("b_enc", lambda a, x: a.preactivation(x)), "prolu": ("b_enc", lambda a, x: a.preactivation(x)),
            "gated": ("b_gate", lambda a, x: a._paths(a._shared(x))[0]), "jumprelu": ("threshold", lambda a, x: a.preactivation(x))}


@torch.no_grad()
def set_density(arch, x: torch.Tensor, density: float) -> float:
    """Shift the family's bias (JumpReLU: its threshold) so that about `density` of the code is nonzero on x,
    as after the sparsity penalty's warm-up (at init about half is); returns the density reached."""
    name, values = ACTIVITY[arch.name]
    q = density_cut(values(arch, x), density)
    param = getattr(arch, name)
    param.copy_(torch.full_like(param, q) if name == "threshold" else param - q)
    return float((arch.encode(x) != 0).float().mean())


def at_threshold(step, threshold: float):
    """step with kernels/dense_code.py's SPARSE_DENSITY set to `threshold`: 0 forces the dense path, 1 the
    sparse one (where the two cross is what SPARSE_DENSITY should be)."""
    def run(x):
        saved, dense_code.SPARSE_DENSITY = dense_code.SPARSE_DENSITY, threshold
        try:
            return step(x)
        finally:
            dense_code.SPARSE_DENSITY = saved
    return run


def floor_fn(d: int, n: int):
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(n, d, generator=g), torch.zeros(n)
    return lambda x: torch.addmm(b, x, W.T)


def time_steps(fn, batches) -> float:
    """Median seconds per step over the batches (the first call of a run is warm-up, not timed)."""
    fn(batches[0])
    times = []
    for x in batches[1:]:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["768x24576:all", "768x98304:topk"],
                    help="d_in x n_latents : architectures ('all' or a comma list)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats of the three measurements")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true", help="the naive step needs ~4 dense B x n buffers")
    ap.add_argument("--isa", choices=["avx2"], help="measure the AVX2 CPU kind on this CPU (bench/machine.py)")
    ap.add_argument("--density", type=float, help="time the dense families at this code density (a trained SAE's: "
                                                  "L0 / n), not at init's ~0.5")
    args = ap.parse_args()
    from machine import cap_isa, describe  # bench/machine.py: which CPU kind the table belongs to

    cap_isa(args.isa)
    torch.set_num_threads(args.threads)

    print(f"{describe()}\nbatch {args.batch}, k {args.k}, fp32 parameters\n")
    rows = []
    for spec in args.configs:
        shape, _, archs = spec.partition(":")
        d, n = map(int, shape.split("x"))
        archs = architecture_names() if archs in ("", "all") else archs.split(",")
        source = SyntheticSource(d_in=d, n_features=8 * d, active_per_vector=16, noise_std=0.02, seed=0, n_eval=256)
        batches = [source.train_batch(i, args.batch) for i in range(args.steps + 1)]
        methods = {"floor": floor_fn(d, n)}
        for arch in archs:
            cfg = {"arch": arch, "d_in": d, "n_latents": n, "normalization": "none",
                   **({"k": args.k} if arch in ARCH_PARAMS else {})}
            trainer = Trainer(cfg, {"train_tokens": 10**9, "batch_size": args.batch, "init_samples": 4096}, source)
            session = trainer.start()
            methods[arch] = session.step
            if args.density and arch in ACTIVITY:
                reached = set_density(session.sae.net, batches[0], args.density)
                print(f"{arch}: code density {reached:.4f} on the first batch")
                if arch == "relu":  # the same step on each path: where the sparse one starts to win
                    methods["relu dense"] = at_threshold(session.step, 0.0)
                    methods["relu sparse"] = at_threshold(session.step, 1.0)
        for arch, naive_k in (("topk", args.k), ("relu", None)):
            if arch in archs and not args.skip_naive:
                methods[f"naive {arch}"] = naive_step_fn(d, n, naive_k, adam_lr(n))
        times = {m: [] for m in methods}
        for _ in range(args.reps):
            for name, fn in methods.items():
                times[name].append(time_steps(fn, batches))
        best = {m: min(ts) for m, ts in times.items()}
        rows.append((d, n, best, times))
        del methods

    print(f"{'d_in':>5} {'n':>7} {'method':>10} {'s/step (reps)':>28} {'vectors/s':>10} {'x floor':>8}")
    for d, n, best, times in rows:
        for m, t in best.items():
            reps = " ".join(f"{x:.3f}" for x in times[m])
            print(f"{d:>5} {n:>7} {m:>10} {reps:>28} {args.batch / t:>10.0f} {t / best['floor']:>8.2f}")
        for arch in ("topk", "relu"):
            if f"naive {arch}" in best:
                print(f"{'':>5} {'':>7} {'':>7} naive {arch} / {arch} = {best[f'naive {arch}'] / best[arch]:.2f}x")
    print("\nx floor: step time / dense-encoder-matmul time (best of reps). Target: topk <= 1.5 at n=98304.")


if __name__ == "__main__":
    main()
