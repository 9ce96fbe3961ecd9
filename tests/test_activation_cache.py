"""The activation cache on a tiny GPT-2: bit-exact round trip, special tokens excluded, multi-layer
stacking, resume after an interrupted build, and rebuilding a truncated shard."""
import numpy as np
import pytest
import torch

import sae_core.activation_cache as ac
from sae_core.activation_cache import ActivationCache, CacheSpec
from sae_core.errors import DataError
from sae_core.lm import ActivationExtractor, load_model

CTX = 16


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(ac, "SHARD_VECTORS", 200)  # several shards from a few hundred vectors


def make_rows(tok, n_rows=60, seed=0):
    g = np.random.default_rng(seed)
    rows = g.integers(0, len(tok) - 1, size=(n_rows, CTX)).astype(np.int32)
    rows[rows == tok.eos_token_id] = 1
    rows[:, 0] = tok.eos_token_id  # separators, as packing puts them, at varying places
    rows[g.random(rows.shape) < 0.1] = tok.eos_token_id
    return rows, rows == tok.eos_token_id


def spec(**kw):
    base = dict(model="tiny-gpt2", model_dtype="float32", site="resid_post", layers=(0, 2), text_key="test",
                context_length=CTX, drop_first=0, prepend_bos=False, train_tokens=500, eval_tokens=150,
                store_dtype="float32")
    return CacheSpec(**{**base, **kw})


def build(tmp_path, tiny_models, **kw):
    lm = load_model(str(tiny_models["gpt2"]))
    rows, excluded = make_rows(lm.tokenizer)
    loads = []

    def load():
        loads.append(1)
        return lm
    cache = ActivationCache(tmp_path, spec(**kw)).ensure(load, lambda _: (rows, excluded), batch_rows=7)
    return cache, lm, rows, excluded, loads


def test_round_trip_is_bit_exact_and_excludes_special_tokens(tmp_path, tiny_models, small_shards):
    cache, lm, rows, excluded, _ = build(tmp_path, tiny_models)
    plan = cache.meta()["plan"]
    assert len(plan["train"]) > 1 and plan["eval"][0][0] == 0 and plan["eval"][-1][1] == plan["train"][0][0]
    acts = ActivationExtractor(lm.model, "resid_post", [0, 2])(torch.from_numpy(rows.astype(np.int64)))
    for li, layer in enumerate((0, 2)):
        for split in ("eval", "train"):
            lo, hi = plan[split][0][0], plan[split][-1][1]
            expected = acts[li, lo:hi][torch.from_numpy(~excluded[lo:hi])]
            src = cache.layer_source(layer)
            got = src.eval_set() if split == "eval" else src._gather(np.arange(src.n_rows))
            assert torch.equal(got, expected), (layer, split)
        special = acts[li][torch.from_numpy(excluded)]  # vectors at separator positions
        cached = torch.cat([cache.layer_source(layer).eval_set(), got])
        assert not (torch.cdist(special, cached, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6).any()  # none of them was stored
    assert cache.layer_source(0).eval_set().shape[0] >= 150 and cache.layer_source(0).n_rows >= 500


def test_multi_layer_batches_hold_equal_numbers_per_layer_with_their_ids(tmp_path, tiny_models, small_shards):
    cache, *_ = build(tmp_path, tiny_models)
    multi = cache.source()
    batch = multi.train_batch(3, 64)
    ids = multi.batch_layer_ids(64)
    assert batch.shape == (64, 32) and (ids == 0).sum() == (ids == 2).sum() == 32
    assert torch.equal(batch[ids == 0], cache.layer_source(0).train_batch(3, 32))
    assert torch.equal(batch[ids == 2], cache.layer_source(2).train_batch(3, 32))
    ev, ev_ids = multi.eval_set(), multi.eval_layer_ids()
    assert torch.equal(ev[ev_ids == 2], cache.layer_source(2).eval_set())


def test_cache_hit_loads_no_model(tmp_path, tiny_models, small_shards):
    build(tmp_path, tiny_models)
    _, _, _, _, loads = build(tmp_path, tiny_models)
    assert loads == []


def test_interrupted_build_resumes_and_truncated_shard_is_rebuilt(tmp_path, tiny_models, small_shards):
    lm = load_model(str(tiny_models["gpt2"]))
    rows, excluded = make_rows(lm.tokenizer)
    cache = ActivationCache(tmp_path, spec())

    seen = []

    def stop_after_two(msg):
        seen.append(msg)
        if len(seen) == 2:
            raise KeyboardInterrupt  # the process dies mid-build
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(lambda: lm, lambda _: (rows, excluded), echo=stop_after_two)
    assert not cache.is_complete()
    first = cache.shard_path("eval", 0, 0)
    before = first.stat().st_mtime_ns
    built = []
    cache.ensure(lambda: lm, lambda _: (rows, excluded), echo=built.append)
    assert cache.is_complete() and first.stat().st_mtime_ns == before  # finished shards were kept
    assert len(built) == sum(len(s) for s in cache.meta()["plan"].values()) - 2
    reference = cache.layer_source(2).train_batch(0, 100)

    victim = cache.shard_path("train", 2, 1)
    victim.write_bytes(victim.read_bytes()[:-40])  # truncated: size no longer matches its sidecar
    assert not cache.is_complete()
    with pytest.raises(DataError, match="incomplete"):
        cache.layer_source(2)  # never read
    rebuilt = []
    cache.ensure(lambda: lm, lambda _: (rows, excluded), echo=rebuilt.append)
    assert len(rebuilt) == 1 and torch.equal(cache.layer_source(2).train_batch(0, 100), reference)


def test_float16_storage_and_key_depends_on_every_field():
    keys = {spec().key(), spec(store_dtype="float16").key(), spec(layers=(1,)).key(), spec(site="resid_pre").key(),
            spec(train_tokens=501).key(), spec(text_key="other").key(), spec(drop_first=1).key()}
    assert len(keys) == 7
