"""Exports reproduce our SAE through the peer's own forward, written from its documented formulas."""
import json

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cli import main
from sae_core import SAE
from sae_core.errors import DataError
from sae_core.export import export

D, N = 12, 40


def trained_like(arch: str, normalization: str, seed: int = 0) -> SAE:
    """Random weights with nonzero biases and non-unit decoder rows, so no term can silently be dropped."""
    cfg = {"arch": arch, "d_in": D, "n_latents": N, "normalization": normalization}
    if arch in ("topk", "batchtopk", "multi_topk"):
        cfg["k"] = 5
    sae = SAE(cfg, init_seed=seed, meta={"hook": {"model": "gpt2", "site": "resid_post", "layers": [3]}})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.arch.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.arch.threshold.copy_(0.05 + 0.05 * torch.rand(N, generator=g))
        if arch == "batchtopk":
            sae.arch.threshold.fill_(0.07)
    return sae


def saelens_forward(folder, x):
    """SAELens v6: layer_norm input normalisation, b_dec subtracted from the input, the architecture's activation."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(folder / "sae_weights.safetensors").items()}
    x = x.double()
    mu, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
    xin = (x - mu) / std if cfg["normalize_activations"] == "layer_norm" else x
    xc = xin - w["b_dec"]
    if cfg["architecture"] == "gated":
        gate = xc @ w["W_enc"] + w["b_gate"]
        mag = xc @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        z = (gate > 0) * mag.relu()
    else:
        pre = xc @ w["W_enc"] + w["b_enc"]
        if cfg["architecture"] == "topk":
            vals, idx = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        elif cfg["architecture"] == "jumprelu":
            z = pre * (pre > w["threshold"])
        else:
            z = pre.relu()
    out = z @ w["W_dec"] + w["b_dec"]
    return out * std + mu if cfg["normalize_activations"] == "layer_norm" else out


@pytest.mark.parametrize("arch", ["topk", "multi_topk", "relu", "jumprelu", "batchtopk", "gated"])
@pytest.mark.parametrize("normalization", ["unit_norm", "standardize", "none"])
def test_saelens_export_reproduces_the_reconstruction(tmp_path, arch, normalization):
    sae = trained_like(arch, normalization)
    sae.save(tmp_path / "run")
    folder = export(tmp_path / "run", "saelens", tmp_path / "out")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2)) * 3 + 1
    ours = sae.reconstruct(x).double()
    assert torch.allclose(saelens_forward(folder, x), ours, atol=1e-4)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_sae"] == N and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"


def test_sparsify_export_reproduces_topk_on_raw_inputs(tmp_path):
    sae = trained_like("topk", "none")
    sae.save(tmp_path / "run")
    folder = export(tmp_path / "run", "sparsify", tmp_path / "out")
    w = {k: v.double() for k, v in load_file(folder / "sae.safetensors").items()}
    cfg = json.loads((folder / "cfg.json").read_text())
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3)).double()
    pre = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()  # sparsify: ReLU, then TopK
    vals, idx = pre.topk(cfg["k"], dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, idx, vals) @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(recon, sae.reconstruct(x.float()).double(), atol=1e-4)
    assert cfg["num_latents"] == N and cfg["d_in"] == D and cfg["multi_topk"] is False


def test_unexportable_saes_and_formats_are_refused_with_the_reason(tmp_path, capsys):
    trained_like("prolu", "unit_norm").save(tmp_path / "prolu")
    trained_like("topk", "unit_norm").save(tmp_path / "topk")
    with pytest.raises(DataError, match="prolu.*no SAELens counterpart"):
        export(tmp_path / "prolu", "saelens", tmp_path / "a")
    with pytest.raises(DataError, match="normalization 'unit_norm'"):
        export(tmp_path / "topk", "sparsify", tmp_path / "b")
    assert main(["export", str(tmp_path / "topk"), "--format", "onnx", str(tmp_path / "c")]) == 2
    assert "allowed: saelens, sparsify" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
    assert main(["export", str(tmp_path / "topk"), "--format", "saelens", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "sae_weights.safetensors").is_file()
