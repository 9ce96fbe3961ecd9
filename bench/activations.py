#!/usr/bin/env python
"""Activation generation and cache reads, each against its plain baseline, in one run.

1. tokens/s of ActivationExtractor (one hooked layer: early exit; the last layer: none possible) against a
   plain forward with output_hidden_states=True, same model, same inputs, interleaved repeats.
2. cache read GB/s: the training source's batches (random rows gathered from memory-mapped shards) and a
   full sequential read through it, against reading the same shard files' bytes raw; cold (pages evicted
   with posix_fadvise DONTNEED) and warm.

Usage: .venv/bin/python bench/activations.py [--model embedded] [--rows 64] [--ctx 64] [--layer 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from timing import best_of  # bench/timing.py

from sae_core.activation_cache import ActivationCache, CacheSpec
from sae_core.lm import ActivationExtractor, load_model


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rows", type=int, default=64, help="token rows per forward batch")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache-tokens", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    n_layers = ActivationExtractor(lm.model, "resid_post", [0]).n_layers
    ids = torch.randint(1000, len(lm.tokenizer) - 1, (args.rows, args.ctx), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()

    def plain():
        with torch.inference_mode():
            lm.model(input_ids=ids, output_hidden_states=True)

    early, last, every = (ActivationExtractor(lm.model, "resid_post", layers)
                          for layers in ([args.layer], [n_layers - 1], list(range(n_layers))))
    methods = {"plain forward, output_hidden_states": plain,
               f"extractor, layer {args.layer} (early exit)": lambda: early(ids),
               f"extractor, layer {n_layers - 1} (last)": lambda: last(ids),
               f"extractor, all {n_layers} layers": lambda: every(ids)}
    times = {m: [] for m in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            times[name].append(best_of(fn, 3))
    print(f"{args.model}: {n_layers} layers, d {lm.model.config.hidden_size}, batch {args.rows} x {args.ctx} tokens, "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'generation':<44} {'tokens/s':>10} {'x plain':>8}")
    base = min(times["plain forward, output_hidden_states"])
    for name, ts in times.items():
        print(f"{name:<44} {tokens / min(ts):>10.0f} {base / min(ts):>8.2f}")

    with tempfile.TemporaryDirectory() as root:
        rows = torch.randint(1000, len(lm.tokenizer) - 1, (args.cache_tokens // args.ctx + 64, args.ctx),
                             generator=torch.Generator().manual_seed(1)).numpy().astype(np.int32)
        excluded = np.zeros(rows.shape, dtype=bool)
        spec = CacheSpec(model=args.model, model_dtype="float32", site="resid_post", layers=(args.layer,),
                         text_key="bench", context_length=args.ctx, drop_first=0, prepend_bos=False,
                         train_tokens=args.cache_tokens, eval_tokens=1024, store_dtype="float16")
        t0 = time.perf_counter()
        cache = ActivationCache(root, spec).ensure(lambda: lm, lambda _: (rows, excluded), batch_rows=args.rows)
        build = time.perf_counter() - t0
        files = sorted((cache.dir / "train").rglob("shard_*.safetensors"))
        nbytes = sum(f.stat().st_size for f in files)
        src = cache.layer_source(args.layer)
        batch = 4096

        def raw_read():
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass

        def source_epoch():  # every training vector once, in the shuffled training order
            for step in range(src.n_rows // batch):
                src.train_batch(step, batch)

        print(f"\ncache: {src.n_rows:,} vectors x {src.d_in} float16 = {nbytes / 1e6:.0f} MB in {len(files)} shards; "
              f"built in {build:.1f} s ({src.n_rows / build:.0f} vectors/s incl. the forward passes)\n")
        print(f"{'cache read':<44} {'GB/s':>10} {'x raw':>8}")
        rows_out = {}
        for label, fn in (("raw read of the shard files", raw_read), ("training batches (random rows, 4096)", source_epoch)):
            for state in ("cold", "warm"):
                if state == "cold":
                    evict(files)
                    t0 = time.perf_counter()
                    fn()
                    t = time.perf_counter() - t0
                else:
                    t = best_of(fn, args.reps)
                rows_out[(label, state)] = t
        for (label, state), t in rows_out.items():
            raw = rows_out[("raw read of the shard files", state)]
            print(f"{label + ', ' + state:<44} {nbytes / t / 1e9:>10.2f} {raw / t:>8.2f}")
        # training batches are float32 in memory: 2x the bytes read; GB/s counts bytes read from the cache


if __name__ == "__main__":
    main()
