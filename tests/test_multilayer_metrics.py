"""Multi-layer SAEs report the metrics as Lawson et al. (2024, "Residual stream analysis with multi-layer
SAEs", App. B.1) define them: the FVU and MSE of each layer's held-out vectors and their mean over layers
(the pooled FVU is kept as `nmse_pooled`); the dead-latent window counts tokens, not vectors (Gao et al.
2024, B.2); and the on-the-fly path (data.cache: false) gives the same rows as the cached one."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from analysis.results import load_curves, load_layers, load_recovery, load_runs
from orchestrator.cli import main
from orchestrator.worker import SharedStream
from sae_core.activation_data import ActivationData, DataConfig, HookConfig
from sae_core.evaluation.reconstruction import evaluate
from sae_core.sources.base import ActivationSource
from sae_core.sources.multilayer import MultiLayerSource
from sae_core.trainer import Trainer

D = 8


class TensorSource(ActivationSource):
    """Fixed in-memory vectors: training batches cycle through `train`, `held` is the eval set."""

    def __init__(self, train: torch.Tensor, held: torch.Tensor):
        self.train, self.held, self.d_in = train, held, train.shape[1]

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        idx = (torch.arange(batch_size) + step * batch_size) % self.train.shape[0]
        return self.train[idx]

    def eval_set(self) -> torch.Tensor:
        return self.held


def two_layers(scale: float = 30.0, n: int = 512, n_eval: int = 256) -> MultiLayerSource:
    """Layer 0 of unit scale, layer 5 `scale` times larger with an offset mean: the pooled FVU is all layer 5."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(n + n_eval, D, generator=g)
    high = scale * torch.randn(n + n_eval, D, generator=g) @ torch.randn(D, D, generator=g) + 3 * scale
    return MultiLayerSource([TensorSource(low[:n], low[n:]), TensorSource(high[:n], high[n:])], [0, 5])


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


def test_nmse_is_the_mean_over_layers_of_each_layers_fvu_in_float64():
    src = two_layers()
    sae_cfg = {"arch": "topk", "d_in": D, "n_latents": 16, "k": 2}
    result = Trainer(sae_cfg, {"train_tokens": 512, "batch_size": 64, "init_samples": 256, "device": "cpu",
                               "curve_eval_tokens": 64}, src).run()
    assert result.status == "ok"
    x, ids = src.eval_set(), src.eval_layer_ids()
    with torch.no_grad():
        x_hat = result.sae.reconstruct(x)
    per_layer = [fvu(x[ids == layer], x_hat[ids == layer]) for layer in (0, 5)]
    pooled = fvu(x, x_hat)
    m = result.metrics
    assert m["nmse"] == pytest.approx(sum(per_layer) / 2, rel=1e-5)
    assert m["nmse_pooled"] == pytest.approx(pooled, rel=1e-5)
    assert abs(m["nmse"] - m["nmse_pooled"]) > 0.1 * m["nmse"]  # on this data the two definitions differ
    mse = [float((x[ids == layer].double() - x_hat[ids == layer].double()).pow(2).mean()) for layer in (0, 5)]
    assert m["mse"] == pytest.approx(sum(mse) / 2, rel=1e-5)
    assert m["mse_pooled"] == pytest.approx(float((x.double() - x_hat.double()).pow(2).mean()), rel=1e-5)
    # each layer's figure is what evaluate() gives on that layer alone (the per-layer table's definition)
    for layer, value in zip((0, 5), per_layer):
        assert evaluate(result.sae, x[ids == layer]).metrics["nmse"] == pytest.approx(value, rel=1e-5)
    # the curve's last point is of the same definition, on equal numbers of vectors from each layer
    curve_x = torch.cat([x[ids == layer][:32] for layer in (0, 5)])
    curve_ids = torch.tensor([0] * 32 + [5] * 32)
    with torch.no_grad():
        curve_hat = result.sae.reconstruct(curve_x)
    last = result.curve[-1]
    assert last["tokens"] == result.tokens  # the final weights (no EMA)
    assert last["nmse"] == pytest.approx(sum(fvu(curve_x[curve_ids == layer], curve_hat[curve_ids == layer])
                                             for layer in (0, 5)) / 2, rel=1e-5)


def test_single_layer_metrics_are_unchanged():
    src = two_layers().sources[1]
    result = Trainer({"arch": "topk", "d_in": D, "n_latents": 16, "k": 2},
                     {"train_tokens": 256, "batch_size": 64, "init_samples": 256, "device": "cpu"}, src).run()
    x = src.eval_set()
    with torch.no_grad():
        assert result.metrics["nmse"] == pytest.approx(fvu(x, result.sae.reconstruct(x)), rel=1e-5)
    assert "nmse_pooled" not in result.metrics and "mse_pooled" not in result.metrics


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_dead_window_counts_tokens_not_vectors(layers):
    """A latent is dead after dead_window_tokens *tokens* unfired (Gao et al. 2024, B.2): L vectors a token."""
    g = torch.Generator().manual_seed(1)
    sources = [TensorSource(torch.randn(256, D, generator=g), torch.randn(32, D, generator=g))
               for _ in range(layers)]
    src = MultiLayerSource(sources, list(range(layers))) if layers > 1 else sources[0]
    window, batch = 12, 4 * layers  # each step is 4 tokens: L * 4 vectors
    trainer = Trainer({"arch": "topk", "d_in": D, "n_latents": 32, "k": 2},
                      {"train_tokens": 1024, "batch_size": batch, "init_samples": 64, "device": "cpu",
                       "dead_window_tokens": window, "resample_dead": 0}, src)
    session = trainer.start()
    with torch.no_grad():  # latent 0 can never win the top k
        session.sae.net.W_enc[0] = 0.0
        session.sae.net.b_enc[0] = -1e6
    for step in range(4):  # 4, 8, 12, 16 tokens
        session.step(src.train_batch(step, batch))
        tokens = 4 * (step + 1)
        assert int(session.tokens_since_fired[0]) == tokens * layers  # the counter itself is in vectors
        assert bool(session.dead_mask()[0]) == (tokens >= window), (step, tokens)


def test_on_the_fly_and_cached_multi_layer_sources_agree(tiny_models, corpus, tmp_path):
    def source(cache: bool):
        data = DataConfig(text={"files": corpus}, context_length=16, train_tokens=384, eval_tokens=96, cache=cache)
        acts = ActivationData(str(tiny_models["gpt2"]), HookConfig(layers="all", multi_layer=True), data,
                              tmp_path / "cache").prepare()
        return SharedStream(acts.source(None))  # as the worker reads it

    live, cached = source(False), source(True)
    for src in (live, cached):
        assert src.vectors_per_token == 3  # the dead window in vectors is 3 x dead_window_tokens
        ids = src.eval_layer_ids()
        assert ids.shape == (src.eval_set().shape[0],)
        assert torch.equal(torch.unique_consecutive(ids), torch.tensor([0, 1, 2]))
        assert len(set(torch.bincount(ids).tolist())) == 1  # equal numbers per layer
    for layer in (0, 1, 2):
        a = live.eval_set()[live.eval_layer_ids() == layer]
        b = cached.eval_set()[cached.eval_layer_ids() == layer]
        n = min(a.shape[0], b.shape[0])
        assert n >= 96
        torch.testing.assert_close(a[:n], b[:n], rtol=1e-3, atol=1e-3)  # the cache is float16


def write_multi_layer_sweep(folder, model, corpus, name: str, cache: bool):
    spec = {"name": name, "model": str(model), "hook": {"site": "resid_post", "layers": "all", "multi_layer": True},
            "data": {"text": {"files": corpus}, "cache": cache, "context_length": 16,
                     "train_tokens": 384, "eval_tokens": 96, "batch_rows": 64},
            "grid": {"arch": ["topk"], "n_latents": [32], "k": [4]},
            "train": {"batch_size": 48, "init_samples": 96, "dead_window_tokens": 64, "curve_eval_tokens": 60},
            "eval": {"recovery_k": [2, 4], "recovery_thresholds": [0.5]}, "pack_size": 1}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_on_the_fly_multi_layer_run_matches_the_cached_one(tiny_models, corpus, tmp_path, ray_local, capsys):
    results = tmp_path / "results"
    rows, layer_tables = {}, {}
    for name, cache in (("live", False), ("cached", True)):
        path = write_multi_layer_sweep(tmp_path, tiny_models["gpt2"], corpus, name, cache)
        assert main(["run", str(path), "--results", str(results)]) == 0
        runs = load_runs(results / name)
        assert len(runs) == 1 and runs.status.iloc[0] == "ok", runs.get("error")
        rows[name], layer_tables[name] = runs.iloc[0], load_layers(results / name).sort_values("layer")
        row, per_layer = rows[name], layer_tables[name]
        assert list(per_layer.layer) == [0, 1, 2] and row.layers == "0,1,2" and pd.isna(row.layer)
        assert row.nmse == pytest.approx(per_layer.nmse.mean(), rel=1e-6)
        assert row.mse == pytest.approx(per_layer.mse.mean(), rel=1e-6)
        assert row.nmse_pooled > 0 and row.mse_pooled > 0
        assert per_layer.nmse.notna().all() and per_layer.downstream_loss.notna().all()
        assert row.downstream_loss == pytest.approx(per_layer.downstream_loss.mean(), rel=1e-6)
        recovery = load_recovery(results / name)  # the point k' = k is the trained SAE: the row's definition
        at_k = recovery[(recovery.activation == "topk") & (recovery.k == 4)]
        assert at_k.nmse.iloc[0] == pytest.approx(row.nmse, rel=1e-6)
        curves = load_curves(results / name)
        assert curves.nmse.notna().all() and curves.tokens.max() == row.tokens
    capsys.readouterr()
    live, cached = layer_tables["live"], layer_tables["cached"]
    assert list(live.columns) == list(cached.columns) and list(live.layer) == list(cached.layer)
    assert set(rows["live"].index) == set(rows["cached"].index)
    # both train the same vectors up to the cache's float16 storage and batch order: similar quality
    assert rows["live"].tokens == rows["cached"].tokens
