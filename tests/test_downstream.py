"""Downstream loss by splicing, against a float64 reference forward with a plain hook; run-level evaluation."""
import math

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT

from sae_core import SAE
from sae_core.activation_data import ActivationData, DataConfig, HookConfig
from sae_core.errors import DataError
from sae_core.evaluation.downstream import DownstreamEval, downstream_row, zeros
from sae_core.evaluation.reconstruction import evaluate
from sae_core.evaluation.run import EvalConfig, evaluate_run
from sae_core.lm import ActivationExtractor, load_model
from sae_core.text.tokens import pack_tokens, special_mask

SITES = ["resid_pre", "resid_post", "resid_post_ln", "mlp_out"]


def held_out(lm, context_length=16, rows=12, drop_first=1):
    tokens = pack_tokens(lm.tokenizer, TINY_TEXT, context_length, rows * context_length)
    excluded = special_mask(tokens, lm.tokenizer, drop_first)
    assert excluded[:, 1:].any(), "the rows should hold separator tokens, to test that they are kept"
    return tokens, excluded


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    lm = load_model(str(tiny_models["gpt2"]))
    return lm, *held_out(lm)


def evaluator(lm, tokens, excluded, site="resid_post", layers=(0, 1, 2)):
    return DownstreamEval(lm, site, list(layers), tokens, excluded, batch_tokens=80)  # 5 rows per batch


def reference(lm, tokens, excluded, layer, replace):
    """CE (clean, spliced) and mean KL in float64, splicing block `layer`'s output by a plain forward hook."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    keep = torch.from_numpy(~excluded)
    block = lm.model.transformer.h[layer]

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[keep] = replace(h[keep])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with torch.no_grad():
        clean = torch.log_softmax(lm.model(ids).logits.double(), -1)[:, :-1]
        handle = block.register_forward_hook(hook)
        try:
            new = torch.log_softmax(lm.model(ids).logits.double(), -1)[:, :-1]
        finally:
            handle.remove()
    target = ids[:, 1:, None]
    ce = lambda lp: float(-lp.gather(-1, target).mean())  # noqa: E731
    kl = float((clean.exp() * (clean - new)).sum(-1).mean())
    return ce(clean), ce(new), kl


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
@pytest.mark.parametrize("site", SITES)
def test_splicing_the_exact_activation_changes_nothing(tiny_models, kind, site):
    lm = load_model(str(tiny_models[kind]))
    ev = evaluator(lm, *held_out(lm), site=site)
    _, out = ev.measure({layer: (layer, lambda v: v) for layer in (0, 1, 2)})
    for s in out.values():
        assert abs(s.loss) < 1e-6 and abs(s.kl) < 1e-6


def test_splices_match_a_float64_reference(gpt2):
    lm, tokens, excluded = gpt2
    shift = torch.randn(32, generator=torch.Generator().manual_seed(0))
    splices = {"zero": (1, zeros), "shift": (2, lambda v: v + shift), "scaled": (0, lambda v: 0.3 * v)}
    clean_ce, out = evaluator(lm, tokens, excluded).measure(splices)
    for name, (layer, replace) in splices.items():
        ref_clean, ref_ce, ref_kl = reference(lm, tokens, excluded, layer, replace)
        assert clean_ce == pytest.approx(ref_clean, abs=1e-5)
        assert out[name].ce == pytest.approx(ref_ce, abs=1e-5)
        assert out[name].loss == pytest.approx(ref_ce - ref_clean, abs=1e-5)
        assert out[name].kl == pytest.approx(ref_kl, abs=1e-5)
        assert out[name].kl > 1e-4


def test_kl_is_never_negative(gpt2):
    lm, tokens, excluded = gpt2
    gen = torch.Generator().manual_seed(1)
    splices = {i: (i % 3, lambda v, s=s: v + s * torch.randn(v.shape, generator=gen))
               for i, s in enumerate([1e-3, 1e-2, 0.1, 1.0, 10.0])}
    _, out = evaluator(lm, tokens, excluded).measure(splices)
    assert all(s.kl >= 0 for s in out.values())


def test_special_positions_keep_their_originals(gpt2):
    lm, tokens, excluded = gpt2
    ids = torch.from_numpy(tokens.astype(np.int64))
    keep = torch.from_numpy(~excluded)
    ext = ActivationExtractor(lm.model, "resid_post_ln", [0])
    seen = {}

    def record(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = lm.model.transformer.h[1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        ext.run_spliced(ids, 0, keep, lambda v: v + 5.0)
        seen_spliced = seen.pop("x")
        lm.model(ids)
        seen_clean = seen.pop("x")
    finally:
        handle.remove()
    assert torch.equal(seen_spliced[~keep], seen_clean[~keep])
    assert (seen_spliced[keep] - seen_clean[keep]).abs().amax(-1).min() > 1e-3


def test_ce_loss_score_is_one_when_perfect_and_zero_under_zero_ablation(gpt2):
    lm, tokens, excluded = gpt2
    clean_ce, out = evaluator(lm, tokens, excluded).measure(
        {"same": (1, lambda v: v), "zero": (1, zeros), "mean": (1, lambda v: v.mean(0).expand_as(v))})
    perfect = downstream_row("ce", 100, clean_ce, out["same"], out["zero"], out["mean"])
    ablated = downstream_row("ce", 100, clean_ce, out["zero"], out["zero"], out["mean"])
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert ablated["ce_loss_score"] == 0.0
    assert perfect["ce_zero_ablation"] == out["zero"].ce and perfect["downstream_kl"] == out["same"].kl


def test_embedded_minilm_cosine_metric_grows_with_reconstruction_error():
    lm = load_model("embedded")
    tokens, excluded = held_out(lm, context_length=32, rows=8, drop_first=0)
    ev = DownstreamEval(lm, "resid_post_ln", [2], tokens, excluded, batch_tokens=128)
    gen = torch.Generator().manual_seed(0)
    scales = [0.0, 0.05, 0.2, 1.0, 4.0]
    clean_ce, out = ev.measure({s: (2, lambda v, s=s: v + s * torch.randn(v.shape, generator=gen)) for s in scales})
    losses = [out[s].loss for s in scales]
    assert clean_ce is None and all(out[s].kl is None and out[s].ce is None for s in scales)
    assert abs(losses[0]) < 1e-6 and all(a < b for a, b in zip(losses, losses[1:])), losses
    assert ev.metric == "embedding_cosine"


def topk_sae(d_in=32, n=64, k=4, seed=0, hook=None):
    return SAE({"arch": "topk", "d_in": d_in, "n_latents": n, "k": k}, meta={"hook": hook} if hook else None,
               init_seed=seed)


def vectors(lm, tokens, excluded, site, layers):
    acts = ActivationExtractor(lm.model, site, layers)(torch.from_numpy(tokens.astype(np.int64)))
    keep = torch.from_numpy(~excluded)
    return acts[:, keep].flatten(0, 1), torch.repeat_interleave(torch.tensor(layers), int(keep.sum()))


def test_run_evaluation_single_layer_recovery_and_downstream(gpt2):
    lm, tokens, excluded = gpt2
    hook = {"model": lm.name, "site": "resid_post", "layers": [1]}
    sae = topk_sae(hook=hook)
    x, _ = vectors(lm, tokens, excluded, "resid_post", [1])
    ev = evaluator(lm, tokens, excluded)
    res = evaluate_run(sae, x, EvalConfig(recovery_k=[1, 4, 16]), [1], ev)
    trained = evaluate(sae, x).metrics
    at_k = next(r for r in res.recovery if r["activation"] == "topk" and r["k"] == 4)
    assert at_k["nmse"] == pytest.approx(trained["nmse"], rel=1e-6) and at_k["l0"] == pytest.approx(trained["l0"])
    jump = [r for r in res.recovery if r["activation"] == "jumprelu"]
    assert len(jump) == 3 and all(r["downstream_loss"] is not None for r in res.recovery)
    # the spliced SAE in the runs-table columns is the SAE's own reconstruction, measured independently
    _, ref_ce, ref_kl = reference(lm, tokens, excluded, 1, lambda v: sae.reconstruct(v))
    assert res.metrics["ce_sae"] == pytest.approx(ref_ce, abs=1e-5)
    assert res.metrics["downstream_kl"] == pytest.approx(ref_kl, abs=1e-5)
    assert res.metrics["downstream_metric"] == "ce" and res.metrics["downstream_null_reason"] is None
    assert res.metrics["downstream_tokens"] == int((~excluded).sum()) and res.layers == []


def test_run_evaluation_multi_layer_reports_each_layer_and_their_mean(gpt2):
    lm, tokens, excluded = gpt2
    sae = topk_sae(hook={"model": lm.name, "site": "resid_post", "layers": [0, 2]})
    x, layer_ids = vectors(lm, tokens, excluded, "resid_post", [0, 2])
    res = evaluate_run(sae, x, EvalConfig(recovery=False), [0, 2], evaluator(lm, tokens, excluded),
                       layer_ids=layer_ids)
    assert [r["layer"] for r in res.layers] == [0, 2] and res.recovery == []
    for key in ("downstream_loss", "downstream_kl", "ce_loss_score"):
        assert res.metrics[key] == pytest.approx(sum(r[key] for r in res.layers) / 2)
    assert res.layers[0]["nmse"] == pytest.approx(evaluate(sae, x[layer_ids == 0]).metrics["nmse"])
    assert res.layers[0]["downstream_loss"] != res.layers[1]["downstream_loss"]


def test_mismatched_model_or_hook_names_both(gpt2):
    lm, tokens, excluded = gpt2
    ev = evaluator(lm, tokens, excluded)
    with pytest.raises(DataError, match=r"d_model 32.*d_in 16"):
        evaluate_run(topk_sae(d_in=16), torch.randn(8, 16), EvalConfig(), [1], ev)
    other = topk_sae(hook={"model": lm.name, "site": "resid_pre", "layers": [1]})
    with pytest.raises(DataError, match=r"resid_post layer 1.*trained on .*resid_pre layers \[1\]"):
        evaluate_run(other, torch.randn(8, 32), EvalConfig(), [1], ev)


def test_no_model_gives_null_downstream_with_the_reason(tmp_path):
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(600, 32)).astype(np.float32))
    data = ActivationData(None, HookConfig(), DataConfig(activations=str(tmp_path / "acts.npy"), train_tokens=400,
                                                         eval_tokens=100)).prepare()
    ev, reason = data.downstream()
    assert ev is None and "file" in reason and data.hook_meta() is None
    res = evaluate_run(topk_sae(), torch.randn(100, 32), EvalConfig(), [], ev, reason)
    assert res.metrics["downstream_null_reason"] == reason
    # every downstream column null (the refinement columns need no model: Gao et al. 2024, §5.1, Fig. 9)
    refinement = ("refined_nmse", "shrinkage", "refinement_mean")
    assert all(v is None for k, v in res.metrics.items() if k != "downstream_null_reason" and k not in refinement)
    assert all(math.isfinite(res.metrics[k]) for k in refinement)
    assert all(r["downstream_loss"] is None and not math.isnan(r["nmse"]) for r in res.recovery)


def test_activation_data_splices_the_held_out_rows(tiny_models, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_TEXT[:40]):
        (corpus / f"doc{i:03d}.txt").write_text(text)
    data = ActivationData(str(tiny_models["gpt2"]), HookConfig(site="resid_post", layers=[1]),
                          DataConfig(text={"files": str(corpus / "*.txt")}, context_length=16, train_tokens=400,
                                     eval_tokens=100, cache_dtype="float32"), tmp_path / "cache").prepare()
    ev, reason = data.downstream(max_tokens=60)
    assert reason is None and 60 <= ev.n_tokens < 60 + 16
    assert data.hook_meta() == {"model": str(tiny_models["gpt2"]), "site": "resid_post", "layers": [1],
                                "context_length": 16}
    spliced_rows = ActivationExtractor(ev.lm.model, "resid_post", [1])(ev.tokens)[0][ev.positions]
    held_out_set = data.source(1).eval_set()
    assert torch.allclose(spliced_rows, held_out_set[: len(spliced_rows)], atol=1e-5)
