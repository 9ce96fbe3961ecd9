"""What machine a benchmark ran on: the CPU kind (vendor, model, the instruction sets that decide which matmul
is fastest: AVX2, AVX-512, AVX512-BF16, AMX), the torch build, and the fastest matmul dtype measured here.

The kind matters: on a CPU with native bf16 (AVX512-BF16 or AMX) a bf16 matmul is several times the fp32 rate
and `topk_select: auto` ranks in bf16; on an AVX2-only CPU bf16 (and int8) matmuls are emulated, many times
slower than fp32, and auto ranks exactly. A table measured on one kind says nothing about the other.

`--isa avx2` (here and in bench/peers.py, bench/train_step.py) measures the AVX2 kind on a newer CPU: the
benchmark re-runs itself with ATen, oneDNN and MKL capped to AVX2 (ISA_CAPS), so no AVX-512 or native bf16
instruction runs. It is an emulation: the instructions of the AVX2 kind, this machine's caches and memory.

    .venv/bin/python bench/machine.py [--isa avx2]       # prints the one-line description
"""
from __future__ import annotations

import os
import platform
import sys
import time

import torch

ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16",
         "amx_int8": "AMX-INT8"}


def cap_isa(isa: str | None) -> None:
    """Re-run this process with the instruction sets capped to `isa` (None: as the machine is). The caps are
    read when torch loads its libraries, so they cannot be set from inside a running process."""
    if isa is None or all(os.environ.get(k) == v for k, v in ISA_CAPS[isa].items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_CAPS[isa]})


def capped() -> str | None:
    """The ISA_CAPS entry this process runs under, if any."""
    return next((isa for isa, env in ISA_CAPS.items() if all(os.environ.get(k) == v for k, v in env.items())), None)


def cpu() -> dict:
    """vendor, model and the FLAGS present, from /proc/cpuinfo (platform's processor name elsewhere)."""
    info = {"vendor": platform.machine(), "model": platform.processor() or "unknown", "flags": []}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"vendor": fields.get("vendor_id", info["vendor"]), "model": fields.get("model name", info["model"]),
            "flags": [name for flag, name in FLAGS.items() if flag in flags]}


def matmul_rates(m: int = 2048, k: int = 768, n: int = 4096, reps: int = 3) -> dict[str, float]:
    """GFLOP/s of an [m, k] @ [k, n] matmul per dtype on the CPU (best of `reps`), the shape of an encoder's."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up: the first call of a dtype pays for its kernel's setup
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[str(dtype).removeprefix("torch.")] = 2 * m * k * n / best / 1e9
    return out


def describe() -> str:
    c, rates = cpu(), matmul_rates()
    fastest = max(rates, key=rates.get)
    build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build")
    kind = ("native bf16" if {"AVX512-BF16", "AMX-BF16"} & set(c["flags"])
            else "AVX2 only (no native bf16)" if "AVX2" in c["flags"] and "AVX-512" not in c["flags"] else "")
    if isa := capped():
        kind = f"capped to {isa.upper()} ({', '.join(ISA_CAPS[isa])}): the {isa.upper()} kind, emulated"
    return (f"machine: {c['vendor']} {c['model']}, {os.cpu_count()} cores ({', '.join(c['flags']) or 'no AVX2'}"
            f"{'; ' + kind if kind else ''}); {build}, {torch.get_num_threads()} threads; matmul "
            + ", ".join(f"{d} {r:,.0f} GFLOP/s" for d, r in rates.items()) + f": fastest {fastest}")


if __name__ == "__main__":
    if "--isa" in sys.argv:
        cap_isa(sys.argv[sys.argv.index("--isa") + 1])
    print(describe())
