import math

import numpy as np
import pandas as pd
import pytest
import torch

from sae_core.errors import DataError
from sae_core.evaluation.width_ladder import compare_ladder, compare_pair, compare_saved, decoder_max_cosine
from sae_core.sae import SAE

D = 8


def make_sae(n: int, seed: int, arch: str = "relu", d_in: int = D) -> SAE:
    cfg = {"arch": arch, "d_in": d_in, "n_latents": n, **({"k": 4} if arch == "topk" else {})}
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.net.reset_parameters(tied=False, seed=seed)
    with torch.no_grad():
        # non-unit decoder rows and nonzero biases, so nothing relies on the trainer's constraint
        sae.net.W_dec.mul_(torch.rand(n, 1, generator=g) + 0.5)
        sae.net.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.net.b_pre.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae


def inputs(n: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2 + torch.randn(D, generator=g)


def dense_max_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    return (a @ b.T).max(dim=1).values


@pytest.mark.parametrize("chunk", [7, 4096])
def test_decoder_max_cosine_matches_dense_reference(chunk):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(23, 5, generator=g) * torch.rand(23, 1, generator=g) * 10
    b = torch.randn(11, 5, generator=g) * torch.rand(11, 1, generator=g) * 10
    got = decoder_max_cosine(a, b, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (23,)
    torch.testing.assert_close(got.double(), dense_max_cos(a, b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_sae_against_itself_has_no_novel_latents(arch):
    sae = make_sae(32, seed=0, arch=arch)
    res = compare_pair(sae, sae, inputs(), batch_size=37)
    torch.testing.assert_close(res.max_cos_large, torch.ones(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.max_cos_small, torch.ones(32), atol=1e-5, rtol=0)
    assert res.novel_frac == 0 and not res.novel.any() and res.per_latent.empty
    assert res.summary["n_novel"] == 0 and res.summary["n_novel_used"] == 0
    assert math.isnan(res.summary["small_mse_diff"])


def test_copied_latents_match_and_novelty_follows_the_random_rows():
    small, large = make_sae(16, seed=0), make_sae(32, seed=1)
    with torch.no_grad():
        for name, p in small.net.named_parameters():
            target = getattr(large.net, name)
            target.copy_(p) if name == "b_pre" else target[:16].copy_(p)
    threshold = 0.7
    res = compare_pair(large, small, inputs(), threshold=threshold)  # order-agnostic: larger given first
    assert (res.n_small, res.n_large) == (16, 32)
    torch.testing.assert_close(res.max_cos_large[:16], torch.ones(16), atol=1e-5, rtol=0)
    assert not res.novel[:16].any()
    ref_novel = dense_max_cos(large.net.W_dec[16:], small.net.W_dec) < threshold
    assert 0 < ref_novel.sum() < 16  # the seed gives both kinds of random rows
    assert torch.equal(res.novel[16:], ref_novel)
    assert res.novel_frac == pytest.approx(ref_novel.double().sum().item() / 32)
    torch.testing.assert_close(res.max_cos_small, torch.ones(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_active_inactive_mse_matches_brute_force(arch):
    small, large, x = make_sae(16, seed=2, arch=arch), make_sae(32, seed=3, arch=arch), inputs(seed=4)
    threshold = 0.7
    novel = (dense_max_cos(large.net.W_dec.detach(), small.net.W_dec.detach()) < threshold).nonzero().squeeze(1)
    assert 4 <= len(novel) < 32  # the seeds give novel and matched latents
    always, never = novel[:2]
    with torch.no_grad():  # one novel latent active on every input and one on none: both must be left out
        large.net.b_enc[always] = 100.0
        large.net.b_enc[never] = -100.0

    res = compare_pair(small, large, x, threshold=threshold, batch_size=37)

    with torch.no_grad():
        active = large.encode(x)[:, novel] != 0
        mse = {k: (x.double() - s.reconstruct(x).double()).pow(2).mean(dim=1) for k, s in
               (("small", small), ("large", large))}
    assert active[:, 0].all() and not active[:, 1].any()
    pl = res.per_latent
    assert pl.latent.tolist() == novel.tolist()
    assert pl.n_active.tolist() == active.sum(dim=0).tolist()
    usable = [j for j in range(len(novel)) if 0 < active[:, j].sum() < len(x)]
    assert res.summary["n_novel"] == len(novel) and res.summary["n_novel_used"] == len(usable) >= 2
    assert res.novel_frac == pytest.approx(len(novel) / 32)
    for k in ("small", "large"):
        on = [mse[k][active[:, j]].mean().item() if active[:, j].any() else np.nan for j in range(len(novel))]
        off = [mse[k][~active[:, j]].mean().item() if not active[:, j].all() else np.nan for j in range(len(novel))]
        np.testing.assert_allclose(pl[f"{k}_mse_active"], on, rtol=1e-9, equal_nan=True)
        np.testing.assert_allclose(pl[f"{k}_mse_inactive"], off, rtol=1e-9, equal_nan=True)
        mean_on, mean_off = np.mean([on[j] for j in usable]), np.mean([off[j] for j in usable])
        assert res.summary[f"{k}_mse_active"] == pytest.approx(mean_on, rel=1e-9)
        assert res.summary[f"{k}_mse_inactive"] == pytest.approx(mean_off, rel=1e-9)
        assert res.summary[f"{k}_mse_diff"] == pytest.approx(mean_on - mean_off, rel=1e-9)


def test_compare_ladder_orders_pairs_by_width():
    saes = [make_sae(32, seed=5), make_sae(8, seed=6), make_sae(16, seed=7)]
    x = inputs()
    table = compare_ladder(saes, x, batch_size=50)
    assert table.n_small.tolist() == [8, 16] and table.n_large.tolist() == [16, 32]
    assert table.iloc[1].to_dict() == pytest.approx(compare_pair(saes[2], saes[0], x).summary, nan_ok=True)


def test_compare_ladder_rejects_bad_inputs():
    with pytest.raises(DataError, match="d_in=8.*d_in=12"):
        compare_ladder([make_sae(8, seed=0), make_sae(16, seed=1, d_in=12)], inputs())
    with pytest.raises(DataError, match="at least 2 SAEs; got 1"):
        compare_ladder([make_sae(8, seed=0)], inputs())


def test_compare_saved_loads_folders(tmp_path):
    saes = [make_sae(16, seed=8, arch="topk"), make_sae(32, seed=9, arch="topk")]
    for name, sae in zip("ab", saes):
        sae.save(tmp_path / name)
    x = inputs()
    pd.testing.assert_frame_equal(compare_saved([tmp_path / "b", str(tmp_path / "a")], x), compare_ladder(saes, x))
