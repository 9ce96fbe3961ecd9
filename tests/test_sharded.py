"""Sharded and data-parallel training on real torch.distributed (gloo) process groups on this machine:
S shards x R replicas must train the SAE the single process trains, and a killed group resumes."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from sae_core.checkpoint import MANIFEST, TrainerState, consolidate
from sae_core.errors import ConfigError
from sae_core.loss_scale import unscale_and_update
from sae_core.optim import row_sparse_parts
from sae_core.parallel.launch import init_distributed, run_local_group, start_local_group, train_local
from sae_core.parallel.mesh import Mesh, build_mesh
from sae_core.sae import SAE
from sae_core.sources.synthetic import SyntheticSource
from sae_core.trainer import Trainer

SOURCE = SyntheticSource(d_in=16, n_features=64, n_eval=512, seed=0)
# n >> B k with a short dead window: AuxK is active from the third step on, so its sharded path is exercised
SAE_CFG = {"arch": "topk", "d_in": 16, "n_latents": 256, "k": 2, "k_aux": 8, "normalization": "none"}
TRAIN = {"train_tokens": 256 * 12, "batch_size": 256, "lr": 1e-3, "init_samples": 512, "dead_window_tokens": 256,
         "topk_select": "exact", "ema_decay": 0.9, "grad_clip": 0.05}  # a clip that binds at every step


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same_curve(mine: list[dict], theirs: list[dict]) -> None:
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert a["nmse"] == pytest.approx(b["nmse"], abs=1e-5)
        assert a.get("aux_loss", 0) == pytest.approx(b.get("aux_loss", 0), abs=1e-5)


@pytest.fixture(scope="module")
def single():
    session = Trainer(SAE_CFG, TRAIN, SOURCE).start()
    session.step(SOURCE.train_batch(0, TRAIN["batch_size"]))
    norm = sum(float(row_sparse_parts(p.grad)[1].pow(2).sum()) for p in session.sae.net.parameters()) ** 0.5
    assert norm == pytest.approx(TRAIN["grad_clip"], rel=1e-4)  # so the shards' norm must be the global one
    result = Trainer(SAE_CFG, TRAIN, SOURCE).run()
    assert any(row.get("aux_loss", 0) > 0 for row in result.curve) and result.metrics["dead_frac"] > 0
    return result


@pytest.mark.parametrize("shards, world, select, arch", [(2, 2, "exact", "topk"), (1, 2, "exact", "topk"),
                                                         (2, 4, "bf16", "topk"), (2, 2, "exact", "multi_topk"),
                                                         (2, 2, "exact", "batchtopk"), (2, 4, "exact", "batchtopk")],
                         ids=["S2", "R2", "S2xR2-bf16", "S2-multi_topk", "S2-batchtopk", "S2xR2-batchtopk"])
def test_group_trains_the_single_process_sae(single, shards, world, select, arch):
    """S = 2 splits the latents, R = 2 halves each replica's rows of the same global batch: either way the
    SAE, its metrics, curve and compute equal the single process's (BatchTopK's cut spans shards and replicas)."""
    sae_cfg, train = {**SAE_CFG, "arch": arch}, {**TRAIN, "topk_select": select}
    ref = single if (select, arch) == ("exact", "topk") else Trainer(sae_cfg, train, SOURCE).run()
    out = run_local_group(train_local, world, (shards, sae_cfg, train, SOURCE))
    assert out[0]["weights"] is not None and all(o["weights"] is None for o in out[1:])
    assert max_diff(out[0]["weights"], ref.sae.net.state_dict()) < 1e-5
    for o in out:  # every rank reports the whole run's figures
        assert o["status"] == "ok" and o["steps"] == ref.steps and o["tokens"] == ref.tokens
        assert o["flops"] == pytest.approx(ref.flops)
        for key in ("nmse", "l0", "dead_frac", "dead_frac_eval"):
            assert o["metrics"][key] == pytest.approx(ref.metrics[key], abs=1e-6), key
        assert_same_curve(o["curve"], ref.curve)


def _select_on_mesh(rank, world, port, weights, x, k, capacity):
    init_distributed(rank, world, "127.0.0.1", port, torch.device("cpu"))
    mesh = build_mesh(world, 1, capacity)
    sae = SAE({**SAE_CFG, "k": k}, init_seed=None, mesh=mesh).double()
    lo = sae.net.latent_start
    sae.net.load_state_dict({name: v[lo:lo + sae.net.n_local] if name in sae.net.latent_parameters() else v
                              for name, v in weights.items()})
    code = sae.net.encode_sparse(x)
    return {(b, int(i) + lo): float(v) for b, (row_i, row_v) in enumerate(zip(code.idx, code.vals))
            for i, v in zip(row_i, row_v) if v > 0}


@pytest.mark.parametrize("capacity", [2.0, 1.0])
def test_sharded_selection_is_the_global_topk_within_capacity(capacity):
    """Capacity >= S: the exact top-k of all n latents. Below: each of the S shards offers its best
    ceil(capacity k / S) and the top k of those wins (the paper's truncation), checked in float64."""
    k, S = 8, 2
    gen = torch.Generator().manual_seed(0)
    sae = SAE({**SAE_CFG, "k": k}, init_seed=3).double()
    with torch.no_grad():
        sae.net.b_enc.copy_(torch.randn(256, generator=gen, dtype=torch.float64))
    weights = sae.net.state_dict()
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    parts = run_local_group(_select_on_mesh, S, (weights, x, k, capacity))
    got = {key: v for part in parts for key, v in part.items()}

    pre = (x - weights["b_pre"]) @ weights["W_enc"].T + weights["b_enc"]
    m = -(-int(capacity * k) // S) if capacity < S else k
    offered = torch.cat([pre[:, s * 128:(s + 1) * 128].topk(m).indices + s * 128 for s in range(S)], dim=1)
    winners = offered.gather(1, pre.gather(1, offered).topk(k).indices)
    want = {(b, int(i)): float(pre[b, i]) for b in range(64) for i in winners[b] if pre[b, i] > 0}
    assert got.keys() == want.keys()
    assert all(abs(got[key] - want[key]) < 1e-12 for key in want)
    if capacity >= S:
        exact = pre.topk(k).indices
        assert winners.sort(dim=1).values.equal(exact.sort(dim=1).values)
    else:  # the cap binds on some rows, else this would test nothing
        assert not winners.sort(dim=1).values.equal(pre.topk(k).indices.sort(dim=1).values)


class SlowSource(SyntheticSource):
    """Synthetic vectors at a pace a test can interrupt."""

    def train_batch(self, step, batch_size):
        time.sleep(0.05)
        return super().train_batch(step, batch_size)


def _manifest_step(out_dir) -> int:
    try:
        return json.loads((out_dir / MANIFEST).read_text())["state"]["step"]
    except (OSError, ValueError):
        return -1


def test_killed_group_resumes_from_its_sharded_checkpoint(tmp_path, single):
    """SIGKILL one rank of a 2-shard run mid-training; the group started again resumes from the last
    committed checkpoint and ends with the SAE of an uninterrupted run."""
    slow = SlowSource(d_in=16, n_features=64, n_eval=512, seed=0)
    train = {**TRAIN, "checkpoint_every_tokens": 256}
    procs, _ = start_local_group(train_local, 2, (2, SAE_CFG, train, slow, str(tmp_path)))
    deadline = time.time() + 120
    while _manifest_step(tmp_path) < 4 and time.time() < deadline:
        time.sleep(0.02)
    killed_at = _manifest_step(tmp_path)
    os.kill(procs[1].pid, signal.SIGKILL)
    for p in procs:
        p.join(timeout=20)
        if p.is_alive():  # blocked in a collective with the dead rank
            p.kill()
            p.join()
    assert 4 <= killed_at < 12, "the kill must land mid-training"
    assert len(list((tmp_path / "trainer_state").iterdir())) >= 1
    out = run_local_group(train_local, 2, (2, SAE_CFG, train, slow, str(tmp_path)))
    assert out[0]["status"] == "ok" and out[0]["steps"] == 12
    assert max_diff(out[0]["weights"], single.sae.net.state_dict()) < 1e-5
    assert_same_curve(out[0]["curve"], single.curve)  # the curve rows before the kill came from the checkpoint
    assert max_diff(SAE.load(tmp_path).net.state_dict(), single.sae.net.state_dict()) < 1e-5


def test_sharded_checkpoint_consolidates_and_resumes_in_one_process(tmp_path, single):
    """A 2-shard run stopped after 5 steps: `consolidate` gives the whole SAE it held, and a single process
    resumes its checkpoint (rows re-read for one shard) to the single-process result."""
    stopped = run_local_group(train_local, 2, (2, SAE_CFG, TRAIN, SOURCE, str(tmp_path), 5))
    assert stopped[0]["status"] == "stopped" and stopped[0]["steps"] == 5
    files = sorted(p.name for p in (tmp_path / "trainer_state").glob("*/*.safetensors"))
    assert files == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert max_diff(consolidate(tmp_path).net.state_dict(), stopped[0]["weights"]) == 0
    resumed = Trainer(SAE_CFG, TRAIN, SOURCE, tmp_path).run()
    assert resumed.status == "ok" and resumed.steps == 12
    assert max_diff(resumed.sae.net.state_dict(), single.sae.net.state_dict()) < 1e-5


@pytest.mark.parametrize("sae, train, mesh, message", [
    ({"arch": "relu"}, {}, Mesh(shards=2), "relu cannot be sharded over latents; allowed with shards > 1: "
                                           "batchtopk, multi_topk, topk"),
    ({"n_latents": 250}, {}, Mesh(shards=4), "shards: 4 does not divide n_latents (250)"),
    ({}, {"batch_size": 255}, Mesh(replicas=2), "train.batch_size: 255 is not a multiple of replicas (2)"),
    ({}, {"resample_dead": 2}, Mesh(shards=2), "train.resample_dead: resampling is not sharded"),
])
def test_layouts_a_run_cannot_take_are_refused(sae, train, mesh, message):
    cfg = {**SAE_CFG, **sae}
    if cfg["arch"] == "relu":
        cfg = {k: v for k, v in cfg.items() if k not in ("k", "k_aux")}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(cfg, {**TRAIN, **train}, SOURCE, mesh=mesh)


def test_loss_scale_skips_non_finite_steps_and_grows_after_finite_ones(monkeypatch):
    import sae_core.loss_scale as ls
    monkeypatch.setattr(ls, "GROWTH_INTERVAL", 3)
    p = torch.nn.Parameter(torch.zeros(4))
    state = TrainerState(loss_scale=8.0)
    p.grad = torch.full((4,), 8.0)
    assert unscale_and_update([p], state, Mesh()) and p.grad.equal(torch.ones(4)) and state.loss_scale == 8.0
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    assert not unscale_and_update([p], state, Mesh()) and state.loss_scale == 4.0
    for _ in range(3):
        p.grad = torch.ones(4)
        assert unscale_and_update([p], state, Mesh())
    assert state.loss_scale == 8.0 and state.loss_scale_good_steps == 0
