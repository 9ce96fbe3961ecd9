"""On-the-fly activations: pure in the step, special tokens excluded, the same vectors a cache would hold."""
import numpy as np
import torch

from sae_core.lm import ActivationExtractor, load_model
from sae_core.sources.streaming import StreamingActivations


def dist(a, b):
    """Exact pairwise distances (cdist's default matmul shortcut has rounding error of ~1e-4 here)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def setup(tiny_models, layer=None):
    lm = load_model(str(tiny_models["neox"]))
    g = np.random.default_rng(0)
    rows = g.integers(0, len(lm.tokenizer) - 1, size=(40, 16)).astype(np.int32)
    rows[g.random(rows.shape) < 0.1] = lm.tokenizer.eos_token_id
    excluded = rows == lm.tokenizer.eos_token_id
    ex = ActivationExtractor(lm.model, "resid_post", [0, 2])
    return StreamingActivations(ex, rows, excluded, eval_tokens=60, seed=3, layer=layer, batch_rows=5), ex, rows, excluded


def test_batches_are_pure_in_the_step_and_drawn_from_usable_positions(tiny_models):
    src, ex, rows, excluded = setup(tiny_models, layer=2)
    a, b, c = src.train_batch(4, 50), src.train_batch(4, 50), src.train_batch(5, 50)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (50, 32)
    acts = ex(torch.from_numpy(rows.astype(np.int64)))[1]  # layer 2
    usable, special = acts[torch.from_numpy(~excluded)], acts[torch.from_numpy(excluded)]
    train_usable = acts[src.train_rows][torch.from_numpy(~excluded[src.train_rows])]
    assert (dist(a, train_usable).min(dim=1).values < 1e-5).all()  # every vector is a usable train vector
    assert not (dist(a, special) < 1e-5).any()
    ev = src.eval_set()
    assert torch.equal(ev, acts[src.eval_rows][torch.from_numpy(~excluded[src.eval_rows])]) and ev.shape[0] >= 60
    assert not (dist(ev, train_usable) < 1e-6).any()  # held-out rows are never trained on
    assert usable.shape[0] == ev.shape[0] + train_usable.shape[0]


def test_multi_layer_stream_has_equal_counts_per_layer(tiny_models):
    src, ex, rows, _ = setup(tiny_models)
    batch = src.train_batch(0, 40)
    acts = ex(torch.from_numpy(rows.astype(np.int64)))
    for half, layer_acts in zip((batch[:20], batch[20:]), acts):
        assert (dist(half, layer_acts.flatten(0, 1)).min(dim=1).values < 1e-5).all()
