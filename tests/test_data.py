"""From model / hook / data settings to sources: validation before any work, cache and on-the-fly paths."""
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sae_core.activation_data import ActivationData, DataConfig, HookConfig
from sae_core.errors import DataError
from sae_core.sources.multilayer import MultiLayerSource
from sae_core.sources.streaming import StreamingActivations


def make(tiny_models, tmp_path, corpus, **kw):
    hook = HookConfig(**kw.pop("hook", {"site": "resid_post", "layers": [0, 2]}))
    data = DataConfig(**{"text": {"files": corpus}, "context_length": 16, "train_tokens": 400, "eval_tokens": 100, **kw})
    return ActivationData(str(tiny_models["gpt2"]), hook, data, tmp_path / "cache")


def test_cached_per_layer_and_multi_layer_sources(tiny_models, tmp_path, corpus):
    acts = make(tiny_models, tmp_path, corpus).prepare()
    assert acts.d_in == 32 and acts.run_layers() == [0, 2]
    src = acts.source(2, seed=1)
    assert src.train_batch(0, 64).shape == (64, 32) and src.eval_set().shape[0] >= 100
    bounded = make(tiny_models, tmp_path, corpus, shuffle_buffer=64).prepare().source(2, seed=1)
    assert bounded.shuffle_buffer == 64 and torch.equal(torch.sort(bounded.train_batch(0, bounded.n_rows), 0)[0],
                                                        torch.sort(src.train_batch(0, src.n_rows), 0)[0])
    multi = make(tiny_models, tmp_path, corpus, hook={"layers": [0, 2], "multi_layer": True}).prepare()
    assert multi.run_layers() == [None] and isinstance(multi.source(None), MultiLayerSource)


def test_on_the_fly_source_matches_the_cache_held_out_set(tiny_models, tmp_path, corpus):
    cached = make(tiny_models, tmp_path, corpus).prepare().source(0)
    live = make(tiny_models, tmp_path, corpus, cache=False).prepare()
    assert not (tmp_path / "cache" / "activations").exists() or len(list((tmp_path / "cache").rglob("meta.json"))) == 1
    stream = live.source(0)
    assert isinstance(stream, StreamingActivations) and stream.train_batch(0, 32).shape == (32, 32)
    # the same first token rows are held out either way
    n = min(cached.eval_set().shape[0], stream.eval_set().shape[0])
    torch.testing.assert_close(stream.eval_set()[:n], cached.eval_set()[:n], rtol=1e-3, atol=1e-3)  # cache is float16


def test_all_layers(tiny_models, tmp_path, corpus):
    acts = make(tiny_models, tmp_path, corpus, hook={"layers": "all"}, cache=False).prepare()
    assert acts.layers == [0, 1, 2]


def test_bring_your_own_activations(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3000, 24)).astype(np.float32))
    acts = ActivationData(None, HookConfig(), DataConfig(activations=str(path), train_tokens=100, eval_tokens=500),
                          tmp_path).prepare()
    assert acts.d_in == 24 and acts.run_layers() == [None] and acts.source(None).eval_set().shape == (500, 24)


@pytest.mark.parametrize("kw, message", [
    ({"hook": {"layers": [0, 5]}}, r"hook.layers: \[5\]"),
    ({"hook": {"site": "resid_post", "layers": [0]}, "context_length": 500}, "data.context_length"),
])
def test_bad_hook_and_context_fail_before_any_work(tiny_models, tmp_path, corpus, kw, message):
    with pytest.raises(DataError, match=message):
        make(tiny_models, tmp_path, corpus, **kw).prepare()
    assert not (tmp_path / "cache" / "activations").exists()  # nothing was built


def test_bad_configs_are_rejected(tiny_models, tmp_path, corpus):
    with pytest.raises(ValidationError, match="site"):
        HookConfig(site="attn_out")
    with pytest.raises(ValidationError, match="exactly one"):
        DataConfig(train_tokens=1)
    with pytest.raises(DataError, match="model: required"):
        ActivationData(None, HookConfig(), DataConfig(text={"files": corpus}, train_tokens=1), tmp_path)
    with pytest.raises(Exception, match="data.text.files"):
        make(tiny_models, tmp_path, str(tmp_path / "nothing" / "*.txt")).prepare()
