"""The CUDA paths on a real GPU (skipped without one; bench/gpu_check.sh runs them): the Triton kernels against
float64 references, the bf16 ranking against exact selection, a training run on the GPU against the same run on
the CPU, and a sharded trainer on one NCCL process against the unsharded one."""
from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")

CUDA = torch.device("cuda")


def test_triton_kernels_match_float64_references_on_the_gpu():
    from sae_core.kernels import triton_rows

    g = torch.Generator().manual_seed(0)
    B, D, N, K = 257, 200, 3000, 33  # not multiples of the blocks: the masks matter
    idx = torch.randint(0, N, (B, K), generator=g)
    idx[0, :5] = 7  # repeated latents in a row and across rows
    w, W, G = torch.randn(B, K, generator=g), torch.randn(N, D, generator=g), torch.randn(B, D, generator=g)
    dense = torch.zeros(B, N, dtype=torch.float64)
    dense.scatter_add_(1, idx, w.double())
    combine = triton_rows.rows_combine(idx.to(CUDA), w.to(CUDA), W.to(CUDA)).double().cpu()
    torch.testing.assert_close(combine, dense @ W.double(), rtol=1e-4, atol=1e-4)
    dot = triton_rows.rows_dot(idx.to(CUDA), G.to(CUDA), W.to(CUDA)).double().cpu()
    torch.testing.assert_close(dot, (G.double() @ W.double().T).gather(1, idx), rtol=1e-4, atol=1e-4)


def test_bf16_ranking_keeps_the_exact_winners_on_the_gpu():
    from sae_core.kernels import EXACT, Selection, topk_encode

    g = torch.Generator().manual_seed(1)
    d, n, k, B = 768, 32768, 32, 4096
    W = torch.randn(n, d, generator=g).to(CUDA) / d**0.5
    b = torch.zeros(n, device=CUDA)
    x = torch.randn(B, d, generator=g).to(CUDA)
    exact = topk_encode(x, W, b, k, selection=EXACT)[1]
    bf16 = topk_encode(x, W, b, k, selection=Selection(torch.bfloat16, 2.0))[1]
    overlap = float((exact.unsqueeze(2) == bf16.unsqueeze(1)).any(2).float().mean())
    assert overlap >= 0.999, overlap


def _run(device: str, **train):
    from sae_core import Trainer
    from sae_core.sources import SyntheticSource

    src = SyntheticSource(d_in=64, n_features=512, active_per_vector=8, seed=0, n_eval=2048)
    cfg = {"arch": "topk", "d_in": 64, "n_latents": 1024, "k": 16}
    return Trainer(cfg, {"train_tokens": 64 * 1024, "batch_size": 1024, "device": device, "topk_select": "exact",
                         **train}, src).run()


def test_a_training_run_on_the_gpu_matches_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    cpu, gpu = _run("cpu"), _run("cuda")
    assert gpu.status == cpu.status == "ok" and gpu.steps == cpu.steps
    assert gpu.metrics["nmse"] == pytest.approx(cpu.metrics["nmse"], rel=1e-3)
    assert gpu.metrics["l0"] == pytest.approx(cpu.metrics["l0"], rel=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sharded_trainer_on_one_nccl_process_matches_the_unsharded_one():
    from sae_core import Trainer
    from sae_core.parallel.launch import init_distributed
    from sae_core.parallel.mesh import build_mesh
    from sae_core.sources import SyntheticSource

    init_distributed(0, 1, "127.0.0.1", _free_port(), CUDA)
    try:
        src = SyntheticSource(d_in=64, n_features=512, active_per_vector=8, seed=0, n_eval=2048)
        cfg = {"arch": "topk", "d_in": 64, "n_latents": 1024, "k": 16}
        train = {"train_tokens": 16 * 1024, "batch_size": 1024, "device": "cuda", "topk_select": "exact"}
        sharded = Trainer(cfg, train, src, mesh=build_mesh(1, 1)).run()
    finally:
        torch.distributed.destroy_process_group()
    plain = Trainer(cfg, train, src).run()
    assert sharded.status == plain.status == "ok"
    assert sharded.metrics["nmse"] == pytest.approx(plain.metrics["nmse"], rel=1e-5)
