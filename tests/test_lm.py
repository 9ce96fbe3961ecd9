"""Hook points on real transformers models against what the model itself reports at that layer."""
import copy

import pytest
import torch

from sae_core.errors import DataError
from sae_core.lm import ActivationExtractor, load_model


def reference(model, site, layer, ids):
    """The same activation through the model's own outputs: hidden states, module hooks, its own norms."""
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    ex = ActivationExtractor(model, "resid_post", [0])  # only to locate blocks and norms
    blocks, n = ex.blocks, ex.n_layers
    got = {}

    def grab(module, key, pre=False):
        if pre:
            return module.register_forward_pre_hook(lambda m, a, kw: got.__setitem__(key, a[0] if a else kw["hidden_states"]),
                                                    with_kwargs=True)
        return module.register_forward_hook(lambda m, a, o: got.__setitem__(key, o[0] if isinstance(o, tuple) else o))

    handles = [grab(blocks[layer], "post"), grab(ex._mlp(layer), "mlp")]
    model(input_ids=ids)
    for h in handles:
        h.remove()
    if site == "resid_pre":
        return hs[layer]
    if site == "resid_post":
        # HF's last hidden state has the final norm applied, so the last block is checked via its hook
        return hs[layer + 1] if layer + 1 < n else got["post"]
    if site == "mlp_out":
        return got["mlp"]
    norm = copy.deepcopy(ex._post_ln_norm(blocks[layer]) if ex.post_ln else ex._next_norm(layer))
    with torch.no_grad():  # the model's own norm with its gain and bias folded out
        norm.weight.fill_(1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
    if ex.post_ln:
        got2 = {}
        h = ex._post_ln_norm(blocks[layer]).register_forward_hook(lambda m, a, o: got2.__setitem__("in", a[0]))
        model(input_ids=ids)
        h.remove()
        return norm(got2["in"])
    return norm(got["post"])


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "resid_post_ln", "mlp_out"])
def test_every_hook_point_matches_the_model(tiny_models, kind, site):
    lm = load_model(str(tiny_models[kind]))
    ids = torch.randint(0, len(lm.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    acts = ActivationExtractor(lm.model, site, [0, 1, 2])(ids)
    assert acts.shape == (3, 2, 12, 32) and acts.dtype == torch.float32
    for i, layer in enumerate([0, 1, 2]):
        with torch.no_grad():
            ref = reference(lm.model, site, layer, ids)
        torch.testing.assert_close(acts[i], ref.float(), rtol=1e-5, atol=1e-5, msg=f"{kind} {site} {layer}")


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "mlp_out"])
def test_early_exit_stops_after_the_deepest_layer_and_matches_the_full_forward(tiny_models, site):
    lm = load_model(str(tiny_models["gpt2"]))
    ids = torch.randint(0, len(lm.tokenizer), (2, 10), generator=torch.Generator().manual_seed(1))
    ex = ActivationExtractor(lm.model, site, [1])
    calls = []
    h = ex.blocks[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    early = ex(ids)
    h.remove()
    assert not calls  # block 2 never ran
    with torch.no_grad():
        torch.testing.assert_close(early[0], reference(lm.model, site, 1, ids).float(), rtol=1e-5, atol=1e-5)


def test_embedded_minilm_loads_offline_and_yields_activations():
    lm = load_model("embedded")
    assert not lm.causal and lm.model.config.hidden_size == 384
    enc = lm.tokenizer(["sparse autoencoders find features"], return_tensors="pt")
    ex = ActivationExtractor(lm.model, "resid_post", [0, 5])
    acts = ex(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[0], hs[1]) and torch.testing.assert_close(acts[1], hs[6])
    ln = ActivationExtractor(lm.model, "resid_post_ln", [2])(enc["input_ids"])
    with torch.no_grad():
        ref = reference(lm.model, "resid_post_ln", 2, enc["input_ids"])
    torch.testing.assert_close(ln[0], ref, rtol=1e-4, atol=1e-4)
    assert ln[0].mean(-1).abs().max() < 1e-4  # normalised: zero mean per token


def test_bad_model_layer_and_site_are_rejected_by_key(tiny_models, tmp_path):
    lm = load_model(str(tiny_models["gpt2"]))
    with pytest.raises(DataError, match=r"hook.layers: \[3\].*allowed: 0..2"):
        ActivationExtractor(lm.model, "resid_post", [0, 3])
    with pytest.raises(DataError, match="hook.site: 'attn_out'.*allowed: resid_pre"):
        ActivationExtractor(lm.model, "attn_out", [0])
    with pytest.raises(DataError, match="model: no-such-org/no-such-model: not found on disk"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="model_dtype"):
        load_model(str(tiny_models["gpt2"]), dtype="int8")
