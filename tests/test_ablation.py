"""Sparsity of ablation effects (Gao et al. 2024, §4.5): the metric against hand-computed values and numpy, and the
sampled evaluation on a tiny GPT-2 against a float64 reimplementation with a plain forward hook."""
import copy
import math

import numpy as np
import pytest
import torch
from test_downstream import evaluator, held_out, topk_sae

from sae_core.evaluation.ablation import ablation_effects, effect_sparsity, evaluate_ablation, sample_ablations
from sae_core.evaluation.run import EvalConfig, evaluate_run
from sae_core.lm import load_model

LAYER = 1


def numpy_sparsity(diff: np.ndarray) -> float:
    v = (diff - np.median(diff, axis=-1, keepdims=True)).ravel()
    return (np.abs(v).sum() / np.linalg.norm(v)) ** 2 / v.size


@pytest.mark.parametrize("vocab", [100, 101])
def test_one_entry_moved_gives_the_minimum(vocab):
    diff = torch.zeros(3, vocab)
    diff[1, 7] = -2.5
    assert effect_sparsity(diff) == pytest.approx(1 / (3 * vocab), rel=1e-12)


def test_hand_computed_values():
    # median 0 (mean of the middle -1 and 1): every entry moves by 1 -> the maximum, 1
    assert effect_sparsity(torch.tensor([[1.0, -1.0, 1.0, -1.0]])) == pytest.approx(1.0, rel=1e-12)
    # median (0 + 1)/2: v = [2.5, -0.5, -0.5, 0.5], ‖v‖₁ = 4, ‖v‖₂² = 7 -> 16 / 7 / 4
    assert effect_sparsity(torch.tensor([[3.0, 0.0, 0.0, 1.0]])) == pytest.approx(4 / 7, rel=1e-12)
    assert math.isnan(effect_sparsity(torch.full((2, 5), 0.3)))  # nothing moves but the median: 0/0


def test_matches_numpy_and_ignores_a_constant_per_position():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 50), (16, 37), (5, 400)]:
        diff = torch.randn(*shape, generator=g) ** 3
        assert effect_sparsity(diff) == pytest.approx(numpy_sparsity(diff.double().numpy()), rel=1e-12)
        shifted = diff + 10 * torch.randn(shape[0], 1, generator=g)
        assert effect_sparsity(shifted) == pytest.approx(effect_sparsity(diff), rel=1e-5)


@pytest.fixture(scope="module")
def setup(tiny_models):
    lm = load_model(str(tiny_models["gpt2"]))
    tokens, excluded = held_out(lm, rows=40)
    sae = topk_sae(hook={"model": lm.name, "site": "resid_post", "layers": [LAYER]})
    return lm, evaluator(lm, tokens, excluded), sae


def test_sampled_metric_lies_in_its_bounds_and_repeats(setup):
    lm, ev, sae = setup
    got, again = evaluate_ablation(sae, ev, LAYER), evaluate_ablation(sae, ev, LAYER)
    # the same samples (seeded); the values up to float32 forwards' summation order, which threads may change
    assert got["ablation_samples"] == again["ablation_samples"]
    assert got == pytest.approx(again, rel=1e-6)
    floor = 1 / (len(lm.tokenizer) * 16)
    assert 0 < got["ablation_samples"] <= 32 * 4
    for key in ("ablation_sparsity", "ablation_sparsity_baseline"):
        assert floor <= got[key] <= 1
    assert 0 < got["ablation_sparsity_se"] < got["ablation_sparsity"]


def test_zero_decoder_rows_have_no_effect_and_are_dropped(setup):
    _, ev, sae = setup
    few = dict(latents=8, positions=2)
    full = sample_ablations(sae, ev, LAYER, **few)
    dead = copy.deepcopy(sae)
    with torch.no_grad():
        dead.net.W_dec[::2] = 0  # TopK's encoder does not read W_dec: the same samples are drawn
    got = evaluate_ablation(dead, ev, LAYER, **few)
    live = full.latents % 2 == 1
    assert 0 < got["ablation_samples"] == int(live.sum()) < len(full.latents)
    values = ablation_effects(ev, LAYER, full.rows[live], full.ts[live], full.delta[live], 16)
    assert got["ablation_sparsity"] == pytest.approx(values.mean(), rel=1e-6)
    with torch.no_grad():
        dead.net.W_dec.zero_()
    none = evaluate_ablation(dead, ev, LAYER, **few)
    assert none["ablation_samples"] == 0 and none["ablation_sparsity"] is None
    assert none["ablation_sparsity_baseline"] is not None  # the channels are ablated all the same


def test_one_sample_matches_a_float64_reference(setup):
    lm, ev, sae = setup
    s = sample_ablations(sae, ev, LAYER)
    got = ablation_effects(ev, LAYER, s.rows[:3], s.ts[:3], s.delta[:3], 16)
    model, sae64 = copy.deepcopy(lm.model).double(), copy.deepcopy(sae).double()
    block = model.transformer.h[LAYER]  # resid_post: the block's output
    for j in range(3):
        row, t, i = int(s.rows[j]), int(s.ts[j]), int(s.latents[j])
        ids = ev.tokens[row:row + 1]

        def ablate(module, args, out, t=t, i=i):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            z = sae64.encode(h[0, t:t + 1])
            assert z[0, i] > 0  # the sample is where the latent is active
            # unit_norm input: the SAE reads (x - mean) / ‖x - mean‖, so z_i W_dec_i is that norm too large here
            assert sae64.cfg.normalization == "unit_norm"
            x = h[0, t]
            h[0, t] -= z[0, i] * sae64.net.W_dec[i] * (x - x.mean()).norm()
            return (h, *out[1:]) if isinstance(out, tuple) else h

        with torch.no_grad():
            clean = model(ids).logits[0].numpy()
            handle = block.register_forward_hook(ablate)
            try:
                new = model(ids).logits[0].numpy()
            finally:
                handle.remove()
        assert np.abs(new[:t] - clean[:t]).max() == 0  # causal: nothing before t moves
        assert got[j] == pytest.approx(numpy_sparsity(new[t:t + 16] - clean[t:t + 16]), rel=1e-4)


def test_evaluate_run_adds_the_columns_only_when_asked(setup):
    from test_downstream import vectors
    lm, ev, sae = setup
    x, _ = vectors(lm, ev.tokens.numpy(), ~ev.positions.numpy(), "resid_post", [LAYER])
    cfg = dict(recovery=False, refinement=False, downstream=False)
    on = evaluate_run(sae, x, EvalConfig(**cfg, ablation=True, ablation_latents=4, ablation_positions=2), [LAYER], ev)
    assert on.metrics["ablation_samples"] == 8 and on.metrics["ablation_sparsity"] is not None
    off = evaluate_run(sae, x, EvalConfig(**cfg), [LAYER], ev)
    assert all(off.metrics[k] is None for k in ("ablation_sparsity", "ablation_sparsity_se",
                                                "ablation_sparsity_baseline", "ablation_samples"))
