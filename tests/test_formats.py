"""Peers' on-disk formats (sae_core/formats): exported folders have exactly the peer's names, dtypes and shapes
and compute our SAE through the peer's own forward (written from its source), and reading them back gives our
SAE again; unexportable SAEs and unreadable folders are refused with the reason."""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.cli import main
from sae_core import SAE
from sae_core.errors import DataError
from sae_core.formats import export
from sae_core.formats.saelens import layer_norm_scale

D, N = 12, 40
SCALE = 50.0  # residual-stream-like scale: SAELens's 1e-5 on std is then negligible
SAELENS = ["topk", "multi_topk", "relu", "jumprelu", "batchtopk", "gated"]


def trained_like(arch: str, normalization: str, seed: int = 0) -> SAE:
    """Random weights with nonzero biases, so no term can silently be dropped; the elementwise families get
    decoder rows of norms 0.5..1.5 (exports must fold them), the TopK family unit-norm ones (as trained)."""
    cfg = {"arch": arch, "d_in": D, "n_latents": N, "normalization": normalization}
    if arch in ("topk", "batchtopk", "multi_topk"):
        cfg["k"] = 5
    sae = SAE(cfg, init_seed=seed, meta={"hook": {"model": "gpt2", "site": "resid_post", "layers": [3],
                                                  "context_length": 64}})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        rows = sae.net.W_dec
        rows.div_(rows.norm(dim=1, keepdim=True))
        if arch in ("relu", "jumprelu", "batchtopk", "gated"):
            rows.mul_(0.5 + torch.rand(N, 1, generator=g))
        if arch == "jumprelu":
            sae.net.threshold.copy_(0.05 + 0.05 * torch.rand(N, generator=g))
        if arch == "batchtopk":
            sae.net.threshold.fill_(0.07)
    return sae


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(seed)) * SCALE + 3.0


def saelens_forward(folder, x):
    """SAELens v6 (sae_lens/saes/*.py) in float64: layer_norm with the unbiased std + 1e-5, b_dec subtracted
    from the input, the architecture's activation. Returns (latents, reconstruction)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(folder / "sae_weights.safetensors").items()}
    x = x.double()
    ln = cfg["normalize_activations"] == "layer_norm"
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xin = (x - mu) / (std + 1e-5) if ln else x
    xc = xin - w["b_dec"] if cfg["apply_b_dec_to_input"] else xin
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
            z = pre.relu() * (pre > w["threshold"])
        else:
            z = pre.relu()
    out = z @ w["W_dec"] + w["b_dec"]
    return z, (out * std + mu if ln else out)


def sparsify_forward(folder, x):
    """sparsify's Sae.encode/decode (sparsify/sparse_coder.py): ReLU, then TopK, on raw activations."""
    w = {k: v.double() for k, v in load_file(folder / "sae.safetensors").items()}
    cfg = json.loads((folder / "cfg.json").read_text())
    pre = ((x.double() - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    vals, idx = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    return z, z @ w["W_dec"] + w["b_dec"]


def exported(tmp_path, arch, normalization, fmt):
    sae = trained_like(arch, normalization)
    sae.save(tmp_path / "run")
    return sae, export(tmp_path / "run", fmt, tmp_path / "out")


def unit_scale(sae: SAE) -> torch.Tensor:
    """The exported latents are ours times the decoder row norms (exports have unit-norm rows)."""
    return sae.net.W_dec.detach().double().norm(dim=1)


@pytest.mark.parametrize("arch", SAELENS)
@pytest.mark.parametrize("normalization", ["unit_norm", "standardize", "none"])
def test_saelens_export_computes_our_sae_through_saelens_forward(tmp_path, arch, normalization):
    sae, folder = exported(tmp_path, arch, normalization, "saelens")
    x = inputs(2)
    z, recon = saelens_forward(folder, x)
    assert torch.allclose(recon, sae.reconstruct(x).double(), rtol=1e-5, atol=1e-4 * SCALE)
    ours = sae.encode(x).double() * unit_scale(sae) / layer_norm_scale(normalization, D)  # in LN units
    assert torch.allclose(z, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", SAELENS)
def test_saelens_folder_has_exactly_the_v6_names_dtypes_and_shapes(tmp_path, arch):
    _, folder = exported(tmp_path, arch, "unit_norm", "saelens")
    w = load_file(folder / "sae_weights.safetensors")
    want = {"W_enc": (D, N), "W_dec": (N, D), "b_dec": (D,)}
    want.update({"b_gate": (N,), "b_mag": (N,), "r_mag": (N,)} if arch == "gated" else {"b_enc": (N,)})
    if arch in ("jumprelu", "batchtopk"):
        want["threshold"] = (N,)
    assert {k: tuple(v.shape) for k, v in w.items()} == want
    assert all(v.dtype == torch.float32 for v in w.values())
    assert torch.allclose(w["W_dec"].double().norm(dim=1), torch.ones(N, dtype=torch.float64), atol=1e-5)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "multi_topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
                                   "batchtopk": "jumprelu", "gated": "gated"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"], cfg["apply_b_dec_to_input"]) == (
        D, N, "layer_norm", True)
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == "6.0.0" and meta["model_name"] == "gpt2"
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["context_size"] == 64
    assert ("k" in cfg) == (cfg["architecture"] == "topk")


def test_sparsify_export_computes_our_topk_through_sparsify_forward(tmp_path):
    sae, folder = exported(tmp_path, "topk", "none", "sparsify")
    x = inputs(3)
    z, recon = sparsify_forward(folder, x)
    assert torch.allclose(recon, sae.reconstruct(x).double(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(z, sae.encode(x).double(), atol=1e-4)
    w = load_file(folder / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {"encoder.weight": (N, D), "encoder.bias": (N,),
                                                          "W_dec": (N, D), "b_dec": (D,)}
    assert all(v.dtype == torch.float32 for v in w.values())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": N / D, "normalize_decoder": True, "num_latents": N,
                   "k": 5, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}


@pytest.mark.parametrize("fmt, arch, normalization", [("saelens", a, n) for a in SAELENS for n in ("unit_norm", "none")]
                         + [("sparsify", "topk", "none"), ("sparsify", "multi_topk", "none")])
def test_export_then_load_gives_our_sae_back(tmp_path, fmt, arch, normalization):
    sae, folder = exported(tmp_path, arch, normalization, fmt)
    back = SAE.load(folder)
    assert back.meta["imported_from"]["format"] == fmt
    x = inputs(4)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5 * SCALE)
    ours = sae.encode(x).double() * (unit_scale(sae) if fmt == "saelens" else 1.0)
    assert torch.allclose(back.encode(x).double(), ours, rtol=1e-5, atol=1e-5)
    if fmt == "saelens":
        assert back.meta["hook"] == {"model": "gpt2", "site": "resid_post", "layers": [3], "context_length": 64}


def test_saelens_folder_without_b_dec_on_the_input_reads_exactly(tmp_path):
    """apply_b_dec_to_input: false (SAELens's option): b_dec is folded into the encoder biases on reading."""
    sae, folder = exported(tmp_path, "relu", "none", "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    w["b_enc"] = w["b_enc"] - w["b_dec"] @ w["W_enc"]
    save_file(w, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    x = inputs(5)
    assert torch.allclose(SAE.load(folder).reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-4)


def test_unexportable_saes_and_runs_are_refused_with_the_reason(tmp_path, capsys):
    trained_like("prolu", "unit_norm").save(tmp_path / "prolu")
    trained_like("topk", "unit_norm").save(tmp_path / "topk")
    skewed = trained_like("topk", "none")
    with torch.no_grad():
        skewed.net.W_dec.mul_(2.0)
    skewed.save(tmp_path / "skewed")
    unset = trained_like("batchtopk", "none")
    with torch.no_grad():
        unset.net.threshold.fill_(-1.0)
    unset.save(tmp_path / "unset")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "trainer_state.json").write_text("{}")
    cases = [("prolu", "saelens", "prolu.*no SAELens counterpart"), ("topk", "sparsify", "normalization 'unit_norm'"),
             ("skewed", "saelens", "not unit-norm"), ("skewed", "sparsify", "not unit-norm"),
             ("unset", "saelens", "no inference threshold yet"), ("unfinished", "saelens", "has not finished"),
             ("missing", "saelens", "no such run folder")]
    for run, fmt, message in cases:
        with pytest.raises(DataError, match=message) as err:
            export(tmp_path / run, fmt, tmp_path / "out")
        assert str(tmp_path / run) in str(err.value)
    assert main(["export", str(tmp_path / "topk"), "--format", "onnx", str(tmp_path / "c")]) == 2
    assert "allowed: saelens, sparsify" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("out", "c"))
    assert main(["export", str(tmp_path / "topk"), "--format", "saelens", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "sae_weights.safetensors").is_file()


def test_a_folder_whose_tensors_do_not_fit_its_config_is_not_exported(tmp_path):
    """export checks the tensors against their config as SAE.load does, so a peer folder is never written
    with a config its weights contradict."""
    trained_like("topk", "none").save(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["sae"]["n_latents"] = N + 1
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    for fmt in ("saelens", "sparsify"):
        with pytest.raises(DataError, match="sae.safetensors: its tensors do not fit the SAE its config describes"):
            export(tmp_path / "run", fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folders_no_format_can_read_are_refused_with_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no SAE here; expected .*SAELens v6.*sparsify"):
        SAE.load(tmp_path / "empty")
    _, folder = exported(tmp_path, "topk", "none", "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {**cfg, "metadata": {**cfg["metadata"], "sae_lens_version": "5.9.0"}}
    (folder / "cfg.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match=r"cfg.json: a SAELens config older than v6"):
        SAE.load(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(DataError, match="normalize_activations 'expected_average_only_in'.*readable: none, layer_norm"):
        SAE.load(folder)
    (tmp_path / "b").mkdir()
    _, sp = exported(tmp_path / "b", "topk", "none", "sparsify")
    (sp / "cfg.json").write_text(json.dumps({**json.loads((sp / "cfg.json").read_text()), "activation": "groupmax"}))
    with pytest.raises(DataError, match="activation: 'groupmax'; readable: 'topk'"):
        SAE.load(sp)


def test_family_comparison_reads_peer_folders(tmp_path):
    """A peer's SAE goes through our evaluations: the family comparison of an exported pair equals ours."""
    from sae_core.evaluation.width_ladder import compare_saved

    folders = []
    for n in (16, 32):
        sae = SAE({"arch": "topk", "d_in": D, "n_latents": n, "k": 4, "normalization": "none"}, init_seed=n)
        sae.save(tmp_path / f"ours{n}")
        folders.append(export(tmp_path / f"ours{n}", "sparsify", tmp_path / f"sp{n}"))
    x = inputs(6)
    theirs = compare_saved(folders, x)
    ours = compare_saved([tmp_path / "ours16", tmp_path / "ours32"], x)
    pd.testing.assert_frame_equal(theirs, ours, rtol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_a_peers_saelens_folder_reads_with_the_peers_own_latents(tmp_path, arch, norm):
    """A SAELens folder not written by us (no sae_scaling block): our SAE gives SAELens's latents and
    reconstruction (up to SAELens's 1e-5 on std)."""
    g = torch.Generator().manual_seed(7)
    w = {"W_enc": torch.randn(D, N, generator=g) / D**0.5, "W_dec": torch.randn(N, D, generator=g) / D**0.5,
         "b_dec": torch.randn(D, generator=g)}
    per_latent = ("b_gate", "b_mag", "r_mag") if arch == "gated" else ("b_enc",)
    w.update({name: 0.1 * torch.randn(N, generator=g) for name in per_latent})
    if arch == "jumprelu":
        w["threshold"] = 0.05 * torch.rand(N, generator=g)
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": norm, "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"},
           **({"k": 6, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {})}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, tmp_path / "sae_weights.safetensors")
    sae = SAE.load(tmp_path)
    assert sae.cfg.arch == {"standard": "relu"}.get(arch, arch)
    assert sae.meta["hook"]["site"] == "resid_pre" and sae.meta["hook"]["layers"] == [8]
    x = inputs(8)
    z, recon = saelens_forward(tmp_path, x)
    assert torch.allclose(sae.encode(x).double(), z, rtol=1e-4, atol=1e-5)
    assert torch.allclose(sae.reconstruct(x).double(), recon, rtol=1e-5, atol=1e-4 * SCALE)


def test_peer_saes_imported_into_a_sweep_get_rows_figures_and_fits(tmp_path, capsys):
    """`sae-scaling import`: SAEs in peers' folders evaluated on the sweep's held-out data, with rows like the
    sweep's own (same nmse as our SAE before export), in the results table, figures and report."""
    import yaml

    from analysis.results import load_runs
    from orchestrator.plan import plan_sweep
    from sae_core.evaluation.reconstruction import evaluate

    spec = {"name": "imp", "data": {"synthetic": {"d_in": D, "n_features": 64, "active_per_vector": 4},
                                    "train_tokens": 4096, "eval_tokens": 1024},
            "grid": {"arch": ["topk"], "n_latents": [32], "k": [4]}, "train": {"batch_size": 256, "init_samples": 256}}
    path = tmp_path / "imp.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = plan_sweep(path, tmp_path / "results")
    eval_x = sweep.of(sweep.runs[0])[1].source(None).eval_set()
    folders, want = [], {}
    for n, fmt in ((32, "sparsify"), (64, "saelens")):
        sae = SAE({"arch": "topk", "d_in": D, "n_latents": n, "k": 4, "normalization": "none"}, init_seed=n)
        sae.save(tmp_path / f"ours{n}")
        folders.append(str(export(tmp_path / f"ours{n}", fmt, tmp_path / f"{fmt}{n}")))
        want[n] = evaluate(sae, eval_x).metrics["nmse"]
    assert main(["import", str(path), *folders, "--results", str(tmp_path / "results")]) == 0
    runs = load_runs(tmp_path / "results" / "imp").set_index("n_latents")
    assert set(runs["imported"]) == {"sparsify", "saelens"} and (runs["status"] == "ok").all()
    for n in (32, 64):
        assert runs.loc[n, "nmse"] == pytest.approx(want[n], rel=1e-5)
        assert runs.loc[n, "run_id"].startswith("import-") and runs.loc[n, "k"] == 4
    assert main(["import", str(path), folders[0], "--results", str(tmp_path / "results")]) == 0  # idempotent
    assert len(load_runs(tmp_path / "results" / "imp")) == 2
    assert main(["figures", str(tmp_path / "results" / "imp")]) == 0
    assert main(["fit", str(tmp_path / "results" / "imp")]) in (0, 1)  # 2 widths: too few for a law, no crash
    assert (tmp_path / "results" / "imp" / "figures" / "nmse_vs_n.png").is_file()
    with pytest.raises(DataError, match="16-dimensional"):
        from orchestrator.import_saes import import_saes
        SAE({"arch": "topk", "d_in": 16, "n_latents": 32, "k": 4}).save(tmp_path / "wide")
        import_saes(path, [tmp_path / "wide"], tmp_path / "results", echo=lambda _: None)
