#!/usr/bin/env python
"""Real activations for the quality benchmarks: the embedded MiniLM-L6's residual stream, as one .npy.

Built through the toolkit's own pipeline (sae_core.activation_data: the embedded text, 64-token rows, special
tokens never vectors, float16 activation cache), then written once as [N_EVAL + vectors, 384] float16: the
first peers.N_EVAL rows are the cache's held-out split, the rest its training vectors in the cache source's
shuffled order. Every trainer's process, ours or a peer's, reads it memory-mapped with numpy alone. The site
is Gao et al. 2024's: the residual stream "directly after the layernorm (with layernorm weights folded into
the attention weights)" (App. B), which on this post-LN encoder is the block's output LayerNorm without its
gain and bias, at the output of block 5 of 6 (their GPT-4 layer is 5/6 of the way through, §2.1).

Usage: .venv/bin/python bench/minilm_vectors.py [--vectors 8192000]   (the benchmarks build it on first use)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402  (bench/peers.py: N_EVAL and the batch size the rows are read in)

LAYER, SITE, D = 4, "resid_post_ln", 384
VECTORS = 8_192_000  # 2,000 steps of 4096: bench/lr_horizon.py's longest budget


def path_for(vectors: int) -> Path:
    from sae_core.text import cache_root

    return cache_root() / "bench" / f"minilm-L{LAYER}-{SITE}-{vectors}.npy"


def ensure(vectors: int, echo=print) -> Path:
    """The file holding N_EVAL held-out rows and `vectors` training rows; built on first use."""
    import numpy as np

    from sae_core.activation_data import ActivationData, DataConfig, HookConfig
    from sae_core.io import write_atomic

    out = path_for(vectors)
    if out.exists():
        return out
    data = ActivationData("embedded", HookConfig(site=SITE, layers=[LAYER]),
                          DataConfig(text={"embedded": True}, train_tokens=vectors, eval_tokens=peers.N_EVAL,
                                     batch_rows=64, device="cpu")).prepare(echo)
    source = data.source(LAYER)

    def fill(tmp: str) -> None:  # straight into the file, memory-mapped: 6 GiB at the default size
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(peers.N_EVAL + vectors, D))
        rows[:peers.N_EVAL] = source.eval_set()[:peers.N_EVAL].numpy()  # whole token rows: a few more
        for start in range(0, vectors, 65536):  # one pass over the source's shuffled training order
            n = min(65536, vectors - start)
            rows[peers.N_EVAL + start:peers.N_EVAL + start + n] = source.train_batch(start // 65536, 65536)[:n].numpy()
        rows.flush()

    write_atomic(out, fill)
    echo(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=VECTORS)
    print(ensure(ap.parse_args().vectors))
