#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU machine, fetched here: its image holds torch, triton, numpy,
# pandas, pyarrow, safetensors, transformers, tokenizers and pytest but not pydantic, and nothing can be
# downloaded there. Into .whl/ (ignored by git), for its Python 3.12 on x86-64 Linux; the device tool carries
# the folder (carry: [".whl"]). The peers (sae-lens, eai-sparsify) and their dependencies are far over the
# 64 MiB a device call carries: their rows of the GPU table say they could not be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl
mkdir .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "pydantic>=2.5,<3"
ls .whl
du -sh .whl
