"""Token rows as Gao et al. and Lawson et al. (appendix A) feed their models: documents joined by a separator
token into one stream, tokenised, cut into rows of exactly context_length tokens, the incomplete tail dropped.

- separator: the tokenizer's EOS, else its SEP (BERT-like encoders have no EOS).
- row start: encoders (the tokenizer has a CLS token) begin every row with CLS, the input they were trained
  on, so CLS takes one of the context_length positions; causal LMs begin with BOS only if `prepend_bos`
  (ignored for encoders, which always get CLS).
- documents that tokenise to nothing are skipped: they would only add a second separator.

`token_rows` caches the rows as <cache_root>/tokens/<name>-<key>.npy (read memory-mapped), keyed by the
tokenizer (name and a hash of its full definition), the text, context_length, n_tokens and prepend_bos.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sae_core.cache_dir import cache_root
from sae_core.errors import ConfigError, DataError
from sae_core.io import write_atomic
from sae_core.text.documents import TextSpec, iter_documents, parse_text_spec

_BATCH_DOCS = 1024  # documents per tokenizer call: the fast tokenizer parallelises within a call
_BATCH_CHARS = 1 << 22  # ... but never more than this many characters, so long documents stay in bounds
_SPECIAL_NAMES = ("bos", "eos", "pad", "cls", "sep", "mask")


def separator_id(tokenizer) -> int:
    for sep in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if sep is not None:
            return sep
    raise DataError(f"tokenizer {tokenizer.name_or_path}: has neither an EOS nor a SEP token to separate documents")


def row_prefix(tokenizer, prepend_bos: bool = False) -> list[int]:
    if tokenizer.cls_token_id is not None:
        return [tokenizer.cls_token_id]
    if not prepend_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise DataError(f"data.prepend_bos: the tokenizer {tokenizer.name_or_path} has no BOS token; "
                        "set prepend_bos: false")
    return [tokenizer.bos_token_id]


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _token_stream(tokenizer, documents: Iterable[str], sep: int) -> Iterator[np.ndarray]:
    """The separator-joined token stream, one array per tokenizer call; documents are pulled lazily."""
    first = True
    for batch in _batches(documents):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        flat = [t for doc in ids if doc for t in (sep, *doc)]
        yield np.asarray(flat[1:] if first else flat, dtype=np.int32)  # separators go between documents only
        first = first and not flat


def _row_blocks(tokenizer, documents: Iterable[str], context_length: int, n_rows: int,
                prepend_bos: bool) -> Iterator[np.ndarray]:
    """Consecutive blocks of complete rows, n_rows in all unless the documents run out first."""
    sep, prefix = separator_id(tokenizer), row_prefix(tokenizer, prepend_bos)
    body = context_length - len(prefix)
    if body < 1:
        raise ConfigError(f"data.context_length: {context_length} leaves no room for text after the row's "
                          f"start token; allowed: {len(prefix) + 1} or more")
    filled, pending = 0, np.empty(0, dtype=np.int32)
    stream = _token_stream(tokenizer, documents, sep)
    while filled < n_rows and (piece := next(stream, None)) is not None:
        pending = np.concatenate([pending, piece])
        take = min(len(pending) // body, n_rows - filled)
        block = np.empty((take, context_length), dtype=np.int32)
        block[:, :len(prefix)] = prefix
        block[:, len(prefix):] = pending[:take * body].reshape(take, body)
        pending = pending[take * body:]
        filled += take
        yield block


def pack_tokens(tokenizer, documents: Iterable[str], context_length: int, max_tokens: int,
                prepend_bos: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [n, context_length] int32, n = ceil(max_tokens / context_length), or fewer if the documents run
    out. `out` (e.g. a memory-mapped file of n rows) receives the rows instead of a new array."""
    blocks = _row_blocks(tokenizer, documents, context_length, -(-max_tokens // context_length), prepend_bos)
    if out is None:
        return np.concatenate([np.empty((0, context_length), dtype=np.int32), *blocks])
    filled = 0
    for block in blocks:
        out[filled:filled + len(block)] = block
        filled += len(block)
    return out[:filled]


def special_ids(tokenizer) -> list[int]:
    """BOS, EOS, PAD, CLS, SEP, MASK and any other registered special token (e.g. chat markers); not UNK,
    which stands for real text the vocabulary lacks."""
    named = {getattr(tokenizer, f"{n}_token_id", None) for n in _SPECIAL_NAMES} - {None}
    return sorted((set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}) | named)


def special_mask(rows: np.ndarray, tokenizer, drop_first: int = 0) -> np.ndarray:
    """True where a position must not become a training vector: a special token, or one of the first
    `drop_first` positions of its row."""
    if not 0 <= drop_first < rows.shape[1]:
        raise ConfigError(f"data.drop_first: {drop_first} is not allowed; allowed: 0 to {rows.shape[1] - 1} "
                          "(context_length - 1)")
    mask = np.isin(rows, special_ids(tokenizer))
    mask[:, :drop_first] = True
    return mask


def rows_holding(valid_per_row: np.ndarray, n_vectors: int) -> int:
    """How many leading rows it takes to hold n_vectors usable positions (the held-out split is the first
    rows); len(valid_per_row) + 1 when they do not suffice."""
    return int(np.searchsorted(np.cumsum(valid_per_row), n_vectors)) + 1


def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: vocabulary, merges, normaliser, pre-tokeniser...
        definition = json.loads(backend.to_str())
        for per_call in ("truncation", "padding"):  # set by each call of the tokenizer, not part of its identity
            definition.pop(per_call, None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    ids = [getattr(tokenizer, f"{n}_token_id", None) for n in _SPECIAL_NAMES]
    digest = hashlib.sha256(json.dumps([definition, ids]).encode()).hexdigest()[:16]
    return f"{tokenizer.name_or_path}:{digest}"


def _cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # absent, truncated or not an .npy file
        return None
    return rows if rows.shape == shape and rows.dtype == np.int32 else None


def token_rows(tokenizer, text_spec: dict | TextSpec, context_length: int, n_tokens: int,
               prepend_bos: bool = False) -> np.ndarray:
    """ceil(n_tokens / context_length) packed rows of `text_spec`, memory-mapped from the token cache, which is
    built (atomically) if absent or unreadable. The caller asks for train + eval tokens together."""
    spec = parse_text_spec(text_spec)
    shape = (-(-n_tokens // context_length), context_length)
    key = json.dumps({"tokenizer": tokenizer_key(tokenizer), "text": spec.key(), "context_length": context_length,
                      "n_tokens": n_tokens, "prepend_bos": prepend_bos}, sort_keys=True)
    slug = "".join(c if c.isalnum() else "-" for c in Path(tokenizer.name_or_path).name)[:40]
    path = cache_root() / "tokens" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if (rows := _cached(path, shape)) is not None:
        return rows

    def build(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=shape)
        filled = len(pack_tokens(tokenizer, iter_documents(spec), context_length, n_tokens, prepend_bos, out=out))
        if filled < shape[0]:
            raise DataError(f"data.text ({spec.source()}): gives {filled * context_length:,} tokens ({filled:,} "
                            f"rows of data.context_length {context_length}); data.train_tokens + "
                            f"data.eval_tokens ask for {n_tokens:,}")
        out.flush()

    write_atomic(path, build)
    return np.load(path, mmap_mode="r")


def check_context_length(model_config, context_length: int) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and context_length > limit:
        raise DataError(f"data.context_length: {context_length} exceeds the model's {limit} positions "
                        f"({getattr(model_config, 'name_or_path', '') or type(model_config).__name__}); "
                        f"allowed: up to {limit}")
