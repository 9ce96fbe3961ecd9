#!/usr/bin/env python
"""Interop with the real peer libraries: our exports loaded by sae_lens and sparsify, and SAEs those libraries
create loaded by us, on the same random activations; max abs differences of latents and reconstructions.

  ours -> peer   our SAE (random weights, nonzero biases; the elementwise families with decoder rows of norm
                 0.5..1.5, which the export folds) exported, then SAE.load_from_disk / Sae.load_from_disk.
                 Latents are compared in the peer's units: the export keeps unit-norm decoder rows and, for
                 SAELens's layer_norm, LN units, so a peer latent is ours x ||d_i|| / s (sae_core/formats).
  peer -> ours   an SAE the library builds (its own init, biases perturbed so none is silently zero), saved
                 with save_model / save_to_disk, then our SAE.load; the latents are then in the same units.

Activations are N(0, 1) x 50 + 3 per element (a residual-stream-like scale). Runs in bench/.venv (sae_lens and
sparsify pinned as in bench/peers.py, built on first use; never a project dependency), importing this repo.
Usage: .venv/bin/python bench/interop.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
D, N, K, SCALE = 64, 256, 8, 50.0


def _trained_like(arch: str, normalization: str):
    import torch

    from sae_core.sae import SAE

    cfg = {"arch": arch, "d_in": D, "n_latents": N, "normalization": normalization}
    if arch in ("topk", "multi_topk", "batchtopk"):
        cfg["k"] = K
    sae = SAE(cfg, init_seed=0, meta={"hook": {"model": "gpt2", "site": "resid_post", "layers": [8],
                                               "context_length": 64}})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        sae.net.W_dec.div_(sae.net.W_dec.norm(dim=1, keepdim=True))
        if arch in ("relu", "jumprelu", "batchtopk", "gated"):
            sae.net.W_dec.mul_(0.5 + torch.rand(N, 1, generator=g))
        if arch == "jumprelu":
            sae.net.threshold.copy_(0.02 + 0.02 * torch.rand(N, generator=g))
        if arch == "batchtopk":
            sae.net.threshold.fill_(0.03)
    return sae


def _peer_dense(fmt: str, peer, x):
    """(latents [B, n], reconstruction) through the peer library's own encode and decode."""
    import torch

    if fmt == "saelens":
        z = peer.encode(x)
        return z, peer.decode(z)
    out = peer.encode(x)
    z = torch.zeros(x.shape[0], peer.num_latents).scatter(1, out.top_indices, out.top_acts)
    return z, peer.decode(out.top_acts, out.top_indices)


def _load_peer(fmt: str, folder: Path):
    if fmt == "saelens":
        from sae_lens import SAE as SaeLensSAE
        return SaeLensSAE.load_from_disk(folder)
    from sparsify import Sae
    return Sae.load_from_disk(folder)


def ours_to_peer(fmt: str, arch: str, normalization: str, tmp: Path, x) -> dict:
    import torch

    from sae_core.formats import export
    from sae_core.formats.saelens import layer_norm_scale

    sae = _trained_like(arch, normalization)
    run = tmp / f"{fmt}-{arch}-{normalization}"
    sae.save(run / "run")
    folder = export(run / "run", fmt, run / "out")
    with torch.no_grad():
        z_peer, recon_peer = _peer_dense(fmt, _load_peer(fmt, folder), x)
        units = sae.net.W_dec.norm(dim=1)
        if fmt == "saelens":
            units = units / layer_norm_scale(normalization, D)
        z_ours, recon_ours = sae.encode(x) * units, sae.reconstruct(x)
    return {"latents": float((z_peer - z_ours).abs().max()), "recon": float((recon_peer - recon_ours).abs().max()),
            "latent_max": float(z_ours.abs().max())}


def _peer_made(fmt: str, arch: str, norm: str):
    import torch

    g = torch.Generator().manual_seed(2)
    if fmt == "sparsify":
        from sparsify import Sae, SaeConfig
        peer = Sae(D, SaeConfig(num_latents=N, k=K))
    else:
        import sae_lens
        cls, cfg_cls = {"standard": ("StandardSAE", "StandardSAEConfig"), "topk": ("TopKSAE", "TopKSAEConfig"),
                        "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig"), "gated": ("GatedSAE", "GatedSAEConfig")}[arch]
        kw = {"k": K} if arch == "topk" else {}
        peer = getattr(sae_lens, cls)(getattr(sae_lens, cfg_cls)(d_in=D, d_sae=N, normalize_activations=norm, **kw))
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.copy_(0.02 + 0.02 * torch.rand(p.shape, generator=g))
    return peer


def peer_to_ours(fmt: str, arch: str, norm: str, tmp: Path, x) -> dict:
    import torch

    from sae_core.sae import SAE

    peer = _peer_made(fmt, arch, norm)
    folder = tmp / f"made-{fmt}-{arch}-{norm}"
    peer.save_model(folder) if fmt == "saelens" else peer.save_to_disk(folder)
    ours = SAE.load(folder)
    with torch.no_grad():
        z_peer, recon_peer = _peer_dense(fmt, peer, x)
        z_ours, recon_ours = ours.encode(x), ours.reconstruct(x)
    return {"latents": float((z_peer - z_ours).abs().max()), "recon": float((recon_peer - recon_ours).abs().max()),
            "latent_max": float(z_peer.abs().max()), "as": ours.cfg.arch}


def worker() -> None:
    from importlib.metadata import version

    import torch

    torch.manual_seed(0)
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(3)) * SCALE + 3.0
    print(f"sae_lens {version('sae-lens')}, sparsify {version('eai-sparsify')}; d {D}, n {N}, k {K}; 512 vectors "
          f"of N(0,1) x {SCALE:g} + 3 (max |x| {float(x.abs().max()):.0f})")
    print("| direction | format | architecture | normalization | max abs Δ latents | (max latent) | "
          "max abs Δ reconstruction |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("saelens", a, n) for a in ("topk", "multi_topk", "relu", "jumprelu", "batchtopk", "gated")
                 for n in ("none", "unit_norm", "standardize")]
        cases += [("sparsify", a, "none") for a in ("topk", "multi_topk")]
        for fmt, arch, norm in cases:
            r = ours_to_peer(fmt, arch, norm, tmp, x)
            print(f"| ours → {fmt} | {fmt} | {arch} | {norm} | {r['latents']:.2e} | {r['latent_max']:.3g} | "
                  f"{r['recon']:.2e} |")
        made = [("saelens", a, n) for a in ("standard", "topk", "jumprelu", "gated") for n in ("none", "layer_norm")]
        for fmt, arch, norm in made + [("sparsify", "topk", "none")]:
            r = peer_to_ours(fmt, arch, norm, tmp, x)
            print(f"| {fmt} → ours | {fmt} | {arch} (ours: {r['as']}) | {norm} | {r['latents']:.2e} | "
                  f"{r['latent_max']:.3g} | {r['recon']:.2e} |")


def main() -> None:
    if "--worker" in sys.argv:
        sys.path.insert(0, str(ROOT))
        worker()
        return
    sys.path.insert(0, str(HERE))
    from peers import ensure_peer_venv  # the same pinned venv

    python = ensure_peer_venv()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sys.exit(subprocess.run([str(python), __file__, "--worker"], env=env).returncode)


if __name__ == "__main__":
    main()
