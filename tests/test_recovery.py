"""Progressive recovery's grid (Gao et al. 2024, §5.3): every point evaluated in one pass over the held-out
vectors gives what evaluating that point alone gives, and encodes each batch once for the whole grid."""
from functools import partial

import pytest
import torch

from sae_core.architectures.entry_code import EntryCode
from sae_core.evaluation import recovery
from sae_core.evaluation.reconstruction import evaluate
from sae_core.sae import SAE

FAMILIES = {"topk": {"k": 6}, "relu": {}, "gated": {}}


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("layered", [False, True])
@pytest.mark.parametrize("n", [64, 4096])
def test_one_pass_over_the_grid_equals_each_point_alone(arch, layered, n):
    sae = SAE({"arch": arch, "d_in": 16, "n_latents": n, **FAMILIES[arch]}, init_seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g) * 2 + 0.5
    layer_ids = torch.randint(0, 3, (300,), generator=g) * 2 if layered else None
    ks = [1, 2, 6, 24]
    keys = [keys for keys, _ in recovery.points(sae, ks, recovery.threshold_grid(sae, x, ks))]

    codes, calls = [], []
    original, apply = sae.net.preactivation, recovery.apply_test_time_activation
    recovery.apply_test_time_activation = lambda h, **kw: codes.append(apply(h, **kw)) or codes[-1]
    sae.net.preactivation = lambda xn: calls.append(xn.shape[0]) or original(xn)
    got = recovery.evaluate_points(sae, x, keys, batch_size=128, layer_ids=layer_ids)
    assert calls == [128, 128, 44]  # one encoder pass per batch, whatever the grid's size
    sae.net.preactivation, recovery.apply_test_time_activation = original, apply
    kinds = {type(c) for c in codes}  # JumpReLU points decoded over their entries, and dense where many pass
    assert EntryCode in kinds and (torch.Tensor in kinds or n == 4096), kinds

    assert len(got) == len(keys) == 8
    for point, metrics in zip(keys, got):
        alone = partial(sae.encode_with, k=point["k"]) if point["k"] else partial(sae.encode_with,
                                                                                 threshold=point["threshold"])
        expect = evaluate(sae, x, batch_size=128, encode=alone, layer_ids=layer_ids).metrics
        for key in ("nmse", "mse", "l0", "l1") + (("nmse_pooled", "mse_pooled") if layered else ()):
            assert metrics[key] == pytest.approx(expect[key], rel=1e-12, abs=1e-12), (point, key)
    assert len({m["l0"] for m in got}) > 4  # the points differ: a shared stale code would not
