"""From a sweep's `model`, `hook` and `data` settings to the activation sources its runs train on.

Bring-your-own activations (data.activations) become a FileSource. Otherwise the model's activations over
the text are built once into the activation cache (data.cache, the default) or computed on the fly by
each run. Everything that can be wrong is checked in `prepare()` before any token is processed: the
model exists, the layers and site exist in it, the context length fits it, the text source exists. The
driver also calls `check_finite()` before training (nan or inf in activation files refused), and the cache
build refuses a model that produces them.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_core.activation_cache import ActivationCache, CacheSpec
from sae_core.cache_dir import cache_root as text_cache_root
from sae_core.errors import ConfigError, DataError
from sae_core.evaluation.downstream import DownstreamEval
from sae_core.lm import SITES, ActivationExtractor, LoadedModel, load_model
from sae_core.lm.loading import local_model_fingerprint
from sae_core.sources.base import ActivationSource
from sae_core.sources.files import FileSource
from sae_core.sources.multilayer import MultiLayerSource
from sae_core.sources.streaming import StreamingActivations
from sae_core.sources.synthetic import SyntheticSource
from sae_core.text.documents import TextSpec
from sae_core.text.tokens import check_context_length, rows_holding, special_mask, token_rows

SYNTHETIC_KEYS = [p for p in inspect.signature(SyntheticSource).parameters if p != "n_eval"]
Site = Literal[SITES]  # type: ignore[valid-type]


class HookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # the residual stream before or after a block (post_ln: after the final LayerNorm), or the MLP's output
    site: Site = "resid_post"
    layers: list[int] | Literal["all"] = [0]  # one SAE per layer, unless multi_layer
    # true: one SAE over every hooked layer (Lawson et al. 2024), false: one per layer; both: the multi-layer
    # SAE and, beside it, one per layer with 1/L of its latents and vectors (equal total latents, same data)
    multi_layer: bool | Literal["both"] = False


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: TextSpec | None = None
    activations: str | list[str] | None = None  # [N, d_in] .npy / .safetensors / .parquet, instead of model + text
    synthetic: dict | None = None  # SyntheticSource settings (d_in, n_features, ...): known ground-truth features
    context_length: int = Field(64, ge=2)  # Gao et al. train on 64-token contexts
    train_tokens: int = Field(ge=1)  # vectors seen per run
    eval_tokens: int = Field(8192, ge=1)  # held out, never trained on
    cache: bool = True  # False: activations computed on the fly by each run
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # how the activation cache stores them
    drop_first: int = Field(0, ge=0)  # positions dropped at the start of every row (besides special tokens)
    prepend_bos: bool = False  # causal LMs: start every row with BOS (it is never a training vector)
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the model's dtype while extracting
    device: str = "auto"  # where the model runs while extracting: auto (cuda if available), cpu, cuda:N
    batch_rows: int = Field(16, ge=1)  # token rows per forward pass
    # rows resident for shuffling (cache and activation files): windows of this many rows read from a few
    # contiguous blocks, for data larger than memory; None: a full permutation per epoch. On the fly, the
    # mixing buffer is one step's token rows.
    shuffle_buffer: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("text", "activations", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of data.text (with model), data.activations or data.synthetic "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @property
    def has_model(self) -> bool:
        return self.text is not None


class ActivationData:
    """The activations a sweep trains on: prepared once by the driver, read by every run."""

    def __init__(self, model: str | None, hook: HookConfig, data: DataConfig, cache_root: str | Path | None = None):
        """cache_root: where activation caches go; default the toolkit's cache root (sae_core.text.cache_root)."""
        if data.has_model and not model:
            raise DataError("model: required with data.text (a hub id, a local folder, or `embedded`)")
        self.model_name, self.hook, self.data = model, hook, data
        self.cache_root = Path(cache_root) if cache_root is not None else text_cache_root()
        self.layers: list[int] = [] if hook.layers == "all" else list(hook.layers)
        self._lm: LoadedModel | None = None

    def _device(self) -> str:
        dev = self.data.device
        return ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev

    def _load(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.model_name, self.data.model_dtype, self._device())
        return self._lm

    def _rows(self, lm: LoadedModel):
        """Packed token rows with enough usable (non-special, non-dropped) positions for train + eval,
        and their exclusion mask. How many positions the separators take depends on the documents'
        lengths, so the request grows until it suffices (the token cache makes a retry cheap)."""
        need = self.data.train_tokens + self.data.eval_tokens
        ctx = self.data.context_length
        n = math.ceil(need * 1.1) + ctx
        while True:
            rows = token_rows(lm.tokenizer, self.data.text, ctx, n, self.data.prepend_bos)
            excluded = special_mask(rows, lm.tokenizer, self.data.drop_first)
            have = int((~excluded).sum())
            if have >= need:
                return rows, excluded
            n = math.ceil(n * need / max(have, 1) * 1.05) + ctx

    def cache(self) -> ActivationCache:
        spec = CacheSpec(model=self.model_name, model_dtype=self.data.model_dtype, site=self.hook.site,
                         layers=tuple(self.layers), text_key=self.data.text.key(),
                         context_length=self.data.context_length, drop_first=self.data.drop_first,
                         prepend_bos=self.data.prepend_bos, train_tokens=self.data.train_tokens,
                         eval_tokens=self.data.eval_tokens, store_dtype=self.data.cache_dtype,
                         model_fingerprint=local_model_fingerprint(self.model_name))
        return ActivationCache(self.cache_root, spec)

    def prepare(self, echo: Callable[[str], None] = lambda s: None, build: bool = True) -> ActivationData:
        """Validate everything, then build the cache if one is used (and `build`). Cheap when the cache exists."""
        if self.data.activations is not None:
            self.d_in = FileSource(self.data.activations, n_eval=self.data.eval_tokens).d_in
            return self
        if self.data.synthetic is not None:
            self.d_in = self._synthetic().d_in
            return self
        lm = self._load()
        check_context_length(lm.model.config, self.data.context_length)
        if self.hook.layers == "all":
            self.layers = list(range(ActivationExtractor(lm.model, self.hook.site, [0]).n_layers))
        extractor = ActivationExtractor(lm.model, self.hook.site, self.layers)  # checks site and layers
        self.d_in = extractor.d_model
        if self.data.cache and build:
            self.cache().ensure(self._load, self._rows, self.data.batch_rows, echo)
        return self

    def check_finite(self, echo: Callable[[str], None] = lambda s: None) -> None:
        """Refuse nan or inf in activation files, naming the file and the first bad row: once, by the driver,
        before any training (it reads every file: ~0.2 s per GiB from the page cache, ~2 s from disk), so a
        bad value is not mistaken for a diverged run. Model activations are checked as the cache is built."""
        if self.data.activations is None:
            return
        files = FileSource(self.data.activations, n_eval=self.data.eval_tokens)
        echo(f"checking data.activations for nan and inf ({files.n_bytes / 2**30:.2f} GiB)")
        files.check_finite()

    def downstream(self, batch_tokens: int = 4096,
                   max_tokens: int | None = None) -> tuple[DownstreamEval | None, str | None]:
        """The splicing evaluator over the held-out rows (the first rows, never trained on), or None and why."""
        if self.data.activations is not None:
            return None, "activations brought from a file: no model to splice into"
        if self.data.synthetic is not None:
            return None, "synthetic activations: no model to splice into"
        lm = self._load()
        tokens, excluded = self._rows(lm)
        want = self.data.eval_tokens if max_tokens is None else min(max_tokens, self.data.eval_tokens)
        end = rows_holding((~excluded).sum(axis=1), want)
        return DownstreamEval(lm, self.hook.site, self.layers, tokens[:end], excluded[:end], batch_tokens), None

    def activation_flops(self) -> float | None:
        """FLOPs of generating the activations once: 2 x the parameters of the blocks up to the deepest hooked
        layer x (train + eval) token positions (attention scores, O(context) per token, left out); one forward
        gives every hooked layer's vector of a position, so a multi-layer SAE's pool costs the same. None
        without a model."""
        if not self.data.has_model:
            return None
        extractor = ActivationExtractor(self._load().model, self.hook.site, self.layers)
        params = sum(p.numel() for block in extractor.blocks[:max(self.layers) + 1] for p in block.parameters())
        return 2.0 * params * (self.data.train_tokens + self.data.eval_tokens)

    def hook_meta(self) -> dict | None:
        """What an SAE trained on these activations reads, saved with it so evaluation can check the match."""
        if not self.data.has_model:
            return None
        return {"model": self.model_name, "site": self.hook.site, "layers": list(self.layers),
                "context_length": self.data.context_length}

    def _synthetic(self, seed: int | None = None) -> SyntheticSource:
        settings = {**self.data.synthetic, "n_eval": self.data.eval_tokens}
        if seed is not None and "seed" not in self.data.synthetic:
            settings["seed"] = seed
        try:
            return SyntheticSource(**settings)
        except TypeError as err:  # an unknown setting
            raise ConfigError(f"data.synthetic: {err}; allowed: {', '.join(SYNTHETIC_KEYS)}") from None
        except ConfigError as err:
            raise ConfigError(f"data.synthetic.{err}") from None

    def run_layers(self) -> list[int | None]:
        """One entry per SAE a grid point trains: each layer, or None for one multi-layer SAE."""
        if not self.data.has_model or self.hook.multi_layer is True:
            return [None]
        return list(self.layers) + ([None] if self.hook.multi_layer == "both" else [])

    def source(self, layer: int | None, seed: int = 0) -> ActivationSource:
        """The training source of one run: one layer, or (None) every hooked layer for a multi-layer SAE."""
        if self.data.synthetic is not None:
            return self._synthetic(seed)
        if self.data.activations is not None:
            return FileSource(self.data.activations, n_eval=self.data.eval_tokens, seed=seed,
                              shuffle_buffer=self.data.shuffle_buffer)
        if self.data.cache:
            return self.cache().source(seed=seed, layer=layer, shuffle_buffer=self.data.shuffle_buffer)
        lm = self._load()
        tokens, excluded = self._rows(lm)
        extractor = ActivationExtractor(lm.model, self.hook.site, self.layers)
        return StreamingActivations(extractor, tokens, excluded, self.data.eval_tokens, seed=seed, layer=layer,
                                    batch_rows=self.data.batch_rows)


__all__ = ["ActivationData", "DataConfig", "HookConfig", "MultiLayerSource"]
