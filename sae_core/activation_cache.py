"""The activation cache: computed once, read (memory-mapped) by every run and sweep that needs the same
activations. Keyed by everything that determines them: model (its name and the content of a local model
folder), its dtype, hook site and layers, the text (with the content of local text files), context length,
token handling, token counts and the storage dtype. Activations are stored raw; an SAE's input
normalisation is applied when it reads them, so one cache serves every normalisation.

Layout, under <root>/activations/<key>/:
  meta.json                                  the spec and the shard plan (token-row ranges per shard)
  eval/layer_LLL/shard_SSSSS.safetensors     held-out vectors ("activations" [n, d_in]); the first token
  train/layer_LLL/shard_SSSSS.safetensors    rows of the text are the eval split, the rest train
  .../shard_SSSSS.json                       written after its shard: vectors, bytes, crc32

A shard counts only if its sidecar matches its file (size and crc32), so an interrupted build resumes where
it stopped and a truncated or corrupt shard is rebuilt, never read. Shards are fixed token-row ranges, so a
rebuilt shard holds exactly what the first build would have written.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from sae_core.lm import ActivationExtractor, LoadedModel
from sae_core.sources.files import FileSource
from sae_core.text.tokens import rows_holding

SHARD_VECTORS = 2**16  # vectors per shard and layer, about: 48 MiB at d=384 in float16
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class CacheSpec:
    model: str
    model_dtype: str
    site: str
    layers: tuple[int, ...]
    text_key: str
    context_length: int
    drop_first: int
    prepend_bos: bool
    train_tokens: int
    eval_tokens: int
    store_dtype: str = "float16"
    # the content of a local model folder (sae_core.lm.loading.local_model_fingerprint): `model` names only
    # the path, and a folder re-saved with other weights must not reuse this cache; None for a hub id
    model_fingerprint: str | None = None

    def key(self) -> str:
        fields = asdict(self)
        if fields["model_fingerprint"] is None:  # left out, so a hub model's caches keep their earlier keys
            del fields["model_fingerprint"]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "-" for c in Path(self.model).name)[:40]
        return f"{slug}-{self.site}-{digest}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _shard_ok(path: Path) -> bool:
    side = path.with_suffix(".json")
    try:
        info = json.loads(side.read_text())
        return path.stat().st_size == info["bytes"] and _crc32(path) == info["crc32"]
    except (OSError, ValueError, KeyError):
        return False


@contextmanager
def _locked(directory: Path):
    """One builder per cache: concurrent runs wait instead of writing the same shards twice."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def plan_shards(valid_per_row: np.ndarray, eval_tokens: int, train_tokens: int) -> dict[str, list[list[int]]]:
    """Row ranges [start, end) per shard: eval from row 0 until eval_tokens vectors, then train until
    train_tokens, each split cut into shards of about SHARD_VECTORS vectors."""
    cum = np.concatenate([[0], np.cumsum(valid_per_row)])
    eval_end = rows_holding(valid_per_row, eval_tokens)
    train_end = int(np.searchsorted(cum, cum[eval_end] + train_tokens))
    if train_end >= len(cum) or eval_end >= len(cum):
        raise DataError(f"data: the text gives {int(cum[-1]):,} usable vectors per layer; "
                        f"data.eval_tokens + data.train_tokens need {eval_tokens + train_tokens:,}")
    plan = {}
    for split, (lo, hi) in {"eval": (0, eval_end), "train": (eval_end, train_end)}.items():
        bounds = [lo]
        while bounds[-1] < hi:
            bounds.append(min(hi, int(np.searchsorted(cum, cum[bounds[-1]] + SHARD_VECTORS))))
        plan[split] = [[a, b] for a, b in zip(bounds[:-1], bounds[1:])]
    return plan


class ActivationCache:
    def __init__(self, root: str | Path, spec: CacheSpec):
        self.spec = spec
        self.dir = Path(root) / "activations" / spec.key()

    def shard_path(self, split: str, layer: int, index: int) -> Path:
        return self.dir / split / f"layer_{layer:03d}" / f"shard_{index:05d}.safetensors"

    def meta(self) -> dict | None:
        try:
            return json.loads((self.dir / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self) -> bool:
        meta = self.meta()
        return bool(meta) and all(_shard_ok(self.shard_path(split, layer, i))
                                  for split, shards in meta["plan"].items()
                                  for layer in self.spec.layers for i in range(len(shards)))

    def ensure(self, load: Callable[[], LoadedModel], rows: Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]],
               batch_rows: int = 16, echo: Callable[[str], None] = lambda s: None) -> ActivationCache:
        """Build whatever is missing. `rows(lm)` gives the packed token rows and their exclusion mask (True =
        special token or dropped position); the model is loaded only if a shard has to be computed."""
        with _locked(self.dir):
            if self.is_complete():
                return self
            lm = load()
            tokens, excluded = rows(lm)
            meta = self.meta()
            if meta is None:
                meta = {"spec": asdict(self.spec), "key": self.spec.key(), "d_in": None,
                        "plan": plan_shards((~excluded).sum(axis=1), self.spec.eval_tokens, self.spec.train_tokens)}
            extractor = ActivationExtractor(lm.model, self.spec.site, list(self.spec.layers))
            meta["d_in"] = extractor.d_model
            write_json_atomic(self.dir / "meta.json", meta)
            device = next(lm.model.parameters()).device
            todo = [(split, i, span) for split, shards in meta["plan"].items() for i, span in enumerate(shards)
                    if not all(_shard_ok(self.shard_path(split, layer, i)) for layer in self.spec.layers)]
            store = STORE_DTYPES[self.spec.store_dtype]
            for n_done, (split, i, (start, end)) in enumerate(todo, 1):
                parts = []
                for lo in range(start, end, batch_rows):
                    ids = torch.from_numpy(tokens[lo:min(end, lo + batch_rows)].astype(np.int64)).to(device)
                    keep = torch.from_numpy(~excluded[lo:min(end, lo + batch_rows)]).to(device)
                    acts = extractor(ids)  # [layers, rows, positions, d]
                    self._check_finite(acts, keep, extractor.layers, lo, self._model_advice())
                    stored = acts.to(store)
                    self._check_finite(stored, keep, extractor.layers, lo, f"data.cache_dtype {self.spec.store_dtype} "
                                       "overflows at this magnitude: use data.cache_dtype: float32")
                    parts.append(stored[:, keep])  # [layers, kept vectors, d]
                acts = torch.cat(parts, dim=1).cpu()
                for layer, layer_acts in zip(extractor.layers, acts):  # the extractor's order: sorted
                    self._write_shard(self.shard_path(split, layer, i), layer_acts)
                echo(f"activation cache {self.dir.name}: {split} shard {i} ({n_done}/{len(todo)})")
            return self

    def _model_advice(self) -> str:
        if self.spec.model_dtype != "float32":
            return f"{self.spec.model_dtype} overflows easily: use data.model_dtype: float32"
        return "the model itself gives them in float32: check its weights"

    def _check_finite(self, acts: torch.Tensor, keep: torch.Tensor, layers: list[int], row0: int,
                      advice: str) -> None:
        """Refuse nan or inf among the kept vectors of a batch of token rows starting at row0, before its shard
        is written: a half-built cache is never counted as done, and training on it would only diverge."""
        bad = ~torch.isfinite(acts).all(dim=-1) & keep  # [layers, rows, positions]
        if bool(bad.any()):
            layer, row, position = bad.nonzero()[0].tolist()
            raise DataError(f"model {self.spec.model}: layer {layers[layer]} ({self.spec.site}) gives "
                            f"nan or inf at token row {row0 + row}, position {position} of the text while building "
                            f"the activation cache; {advice}")

    @staticmethod
    def _write_shard(path: Path, acts: torch.Tensor) -> None:
        save_safetensors_atomic({"activations": acts}, path)
        info = {"vectors": int(acts.shape[0]), "bytes": path.stat().st_size, "crc32": _crc32(path)}
        write_text_atomic(path.with_suffix(".json"), json.dumps(info))

    def _check_complete(self) -> None:
        if not self.is_complete():
            raise DataError(f"{self.dir}: activation cache incomplete; run the sweep (or ensure()) to build it")

    def _layer_source(self, layer: int, seed: int, shuffle_buffer: int | None) -> FileSource:
        folder = f"layer_{layer:03d}"
        return FileSource(sorted((self.dir / "train" / folder).glob("shard_*.safetensors")), seed=seed,
                          eval_paths=sorted((self.dir / "eval" / folder).glob("shard_*.safetensors")),
                          shuffle_buffer=shuffle_buffer)

    def layer_source(self, layer: int, seed: int = 0, shuffle_buffer: int | None = None) -> FileSource:
        """Training vectors of one layer (shuffled per epoch by seed, within windows of shuffle_buffer rows
        if given) with the cache's held-out split. Every shard is verified first: a bad one is never read."""
        self._check_complete()
        return self._layer_source(layer, seed, shuffle_buffer)

    def source(self, seed: int = 0, layer: int | None = None, shuffle_buffer: int | None = None):
        """One layer's source, or (layer None) the multi-layer source over every cached layer."""
        from sae_core.sources.multilayer import MultiLayerSource

        if layer is not None:
            return self.layer_source(layer, seed, shuffle_buffer)
        self._check_complete()  # once for all layers: it reads every shard
        return MultiLayerSource([self._layer_source(layer, seed, shuffle_buffer) for layer in self.spec.layers],
                                list(self.spec.layers))
