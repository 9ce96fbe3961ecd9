"""The Triton kernels (used on CUDA) against the torch path, run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so the comparisons run in a fresh process
(this file run as a script) and the test asserts on what it reports."""
import json
import os
import subprocess
import sys

import pytest
import torch

B, D, N, K = 9, 200, 1000, 20  # d and k not multiples of the blocks: the masks matter; N: most rows absent


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (B, K), generator=g)
    idx[0, :5] = 7  # repeated latents in a row and across rows: scatter must sum them
    idx[3, :3] = 7
    return idx, torch.randn(B, K, generator=g), torch.randn(N, D, generator=g), torch.randn(B, D, generator=g)


def _compare() -> dict:
    from sae_core.kernels import sparse_rows, triton_rows

    def diff(a, b):
        return float((a.double() - b.double()).abs().max())

    idx, w, W, G = _inputs(0)
    out = {"combine": diff(triton_rows.rows_combine(idx, w, W), sparse_rows.rows_combine(idx, w, W)),
           "dot": diff(triton_rows.rows_dot(idx, G, W), sparse_rows.rows_dot(idx, G, W))}
    ref = sparse_rows.rows_scatter(idx, w, G, N)
    sparse_rows._triton = lambda *tensors: triton_rows  # the same CSR grouping, summed by the kernel
    got = sparse_rows.rows_scatter(idx, w, G, N)
    out["scatter_rows_equal"] = bool(torch.equal(got.indices(), ref.indices()))
    out["scatter"] = diff(got.values(), ref.values())
    dense = torch.zeros(N, D, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), w.reshape(-1, 1).double() * G.double().repeat_interleave(K, 0))
    out["scatter_vs_float64"] = diff(got.to_dense(), dense)
    few = 40  # most rows occur: the dense gradient, its empty rows written as zeros by the same kernel
    small = idx % few
    dense_got = sparse_rows.rows_scatter(small, w, G, few)
    out["scatter_dense_is_dense"] = not dense_got.is_sparse
    out["scatter_dense_vs_float64"] = diff(dense_got, torch.zeros(few, D, dtype=torch.float64).index_add_(
        0, small.reshape(-1), w.reshape(-1, 1).double() * G.double().repeat_interleave(K, 0)))
    half = triton_rows.rows_combine(idx, w, W.bfloat16())
    out["bf16_dtype"] = str(half.dtype)
    ref = sparse_rows.rows_combine(idx, w.double(), W.bfloat16().double())
    out["bf16_rel"] = float(((half.double() - ref).abs() / (ref.abs() + 1)).max())
    return out


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_combine_and_dot_equal_the_torch_path(report):
    assert report["combine"] < 1e-5 and report["dot"] < 1e-5


def test_scatter_equals_the_torch_path_and_float64(report):
    assert report["scatter_rows_equal"]
    assert report["scatter"] < 1e-5 and report["scatter_vs_float64"] < 1e-5
    assert report["scatter_dense_is_dense"] and report["scatter_dense_vs_float64"] < 1e-5


def test_bf16_weights_accumulate_in_fp32(report):
    # fp32 accumulation: what remains is the final conversion to bf16, within one ulp (2^-7 relative; the
    # interpreter truncates there where a GPU rounds to nearest)
    assert report["bf16_dtype"] == "torch.bfloat16" and report["bf16_rel"] < 2**-7


def test_cpu_tensors_take_the_torch_path():
    from sae_core.kernels import sparse_rows
    idx, _, W, _ = _inputs(3)
    assert sparse_rows._triton(idx, W) is None


if __name__ == "__main__":
    print(json.dumps(_compare()))
