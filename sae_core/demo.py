"""Ground-truth demo: a TopK SAE trained on synthetic activations built from a known dictionary.

The defaults are the case the trainer is held to: d_in=128, 1024 true features, about 8 active per
vector, noise 0.01, an SAE with n=2048 and k=8; MMCS (mean over true features of the best cosine
similarity with a decoder row) must reach 0.9 within 5M vectors.
"""
from __future__ import annotations

import time
from functools import partial

from sae_core.sources import SyntheticSource, mmcs
from sae_core.trainer import Trainer


def run_demo(d_in: int = 128, n_features: int = 1024, active: float = 8.0, noise: float = 0.01,
             n_latents: int = 2048, k: int = 8, tokens: int = 5_000_000, batch_size: int = 4096,
             seed: int = 0, echo=None) -> dict:
    echo = echo or partial(print, flush=True)
    source = SyntheticSource(d_in=d_in, n_features=n_features, active_per_vector=active, noise_std=noise,
                             seed=seed, n_eval=8192)
    sae_cfg = {"arch": "topk", "d_in": d_in, "n_latents": n_latents, "k": k, "normalization": "none"}
    train_cfg = {"train_tokens": tokens, "batch_size": batch_size, "seed": seed,
                 "dead_window_tokens": min(10_000_000, max(tokens // 20, batch_size))}
    echo(f"TopK SAE n={n_latents} k={k} on synthetic activations: d_in={d_in}, {n_features} true features, "
         f"~{active:g} active per vector, noise {noise:g}; {tokens:,} vectors")
    echo(f"{'tokens':>12} {'nmse':>8} {'l0':>6} {'dead':>6} {'mmcs':>6}")

    def recovery(sae, row):
        score = mmcs(sae.net.W_dec, source.features)
        echo(f"{row['tokens']:>12,} {row['nmse']:>8.4f} {row['l0']:>6.2f} {row['dead_frac']:>6.3f} {score:>6.3f}")
        return {"mmcs": score}

    t0 = time.time()
    result = Trainer(sae_cfg, train_cfg, source).run(curve_metrics=recovery)
    final = result.curve[-1]["mmcs"]
    echo(f"held-out nmse {result.metrics['nmse']:.4f}, MMCS {final:.3f}, {time.time() - t0:.0f} s on {result.device}")
    return {"mmcs": final, **result.metrics}
