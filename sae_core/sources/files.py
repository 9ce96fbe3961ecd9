"""Pre-computed activations from .npy, .safetensors or .parquet files, memory-mapped where the format allows."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sae_core.errors import DataError
from sae_core.sources.base import ActivationSource, EpochStream, check_arg, is_int

_ALLOWED_DTYPES = "float16, bfloat16, float32, float64"
_ALLOWED_PARQUET = "one column of equal-length lists of floats, or float columns (one per dimension)"
_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64}
_SPLIT_SEED = 0x5AE5  # independent of the training seed, so changing it never moves rows between train and eval
SCAN_CHUNK_BYTES = 64 << 20  # read per step of the finiteness scan: memory stays bounded whatever the file size


@dataclass
class _Shard:
    path: str
    data: np.ndarray  # [rows, d_in]: a memmap, or an in-memory float32 array for parquet
    bf16: bool = False

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """float32 rows; torch converts half precision with SIMD, several times faster than numpy's astype."""
        block = torch.from_numpy(np.ascontiguousarray(self.data[rows]))
        if self.bf16:  # stored as uint16: the high half of a float32
            return block.view(torch.int16).view(torch.bfloat16).float()
        return block.float()

    def check_finite(self, chunk_bytes: int = SCAN_CHUNK_BYTES) -> None:
        """DataError naming the first row holding nan or inf, read chunk_bytes at a time."""
        step = max(1, chunk_bytes // (self.data.shape[1] * self.data.itemsize))
        for lo in range(0, len(self.data), step):
            bad = _nonfinite(self.data[lo:lo + step], self.bf16)
            if bad.any():
                i, j = (int(v) for v in np.argwhere(bad)[0])
                value = float(self.take(np.array([lo + i]))[0, j])
                raise DataError(f"{self.path}: row {lo + i} (column {j}) holds {value}; activations must be "
                                "finite: fix or drop the rows holding nan or inf (a float16 overflow while "
                                "extracting them is the usual cause: extract in float32)")


def _nonfinite(block: np.ndarray, bf16: bool) -> np.ndarray:
    """Where block holds nan or inf. Half precision is tested on its exponent bits (all ones): numpy has no
    bfloat16, and its float16 isfinite is about twice as slow as the bit test."""
    if block.itemsize == 2:
        exponent = np.uint16(0x7F80 if bf16 else 0x7C00)
        return (block.view(np.uint16) & exponent) == exponent
    return ~np.isfinite(block)


def _check_shape(path: str, shape: tuple, what: str = "array") -> None:
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise DataError(f"{path}: {what} has shape {tuple(shape)}; expected a 2-D array [rows, d_in] "
                        "with at least one row and one column")


def _open_npy(path: str) -> _Shard:
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a .npy array [rows, d_in] ({_ALLOWED_DTYPES})")
    try:
        data = np.load(path, mmap_mode="r")
    except Exception as e:  # np.load fails in many ways on a damaged file (EOFError, ValueError, pickle errors)
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); expected a .npy array "
                        f"[rows, d_in] ({_ALLOWED_DTYPES})") from None
    _check_shape(path, data.shape)
    if data.dtype.kind != "f" or data.dtype.itemsize > 8:
        raise DataError(f"{path}: dtype {data.dtype} is not supported; allowed: {_ALLOWED_DTYPES}")
    return _Shard(path, data)


def _safetensors_header(path: str, size: int) -> tuple[int, dict]:
    """The header's length and its tensor entries (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            if size < 8 or 8 + header_len > size:
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(header_len))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            if not all(isinstance(v, dict) for v in tensors.values()):
                raise ValueError("a tensor entry is not an object")
        except (ValueError, AttributeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DataError(f"{path}: not a valid .safetensors file ({e})") from None
    return header_len, tensors


def _open_safetensors(path: str) -> _Shard:
    size = os.path.getsize(path)
    header_len, tensors = _safetensors_header(path, size)
    name = next(iter(tensors)) if len(tensors) == 1 else "activations"
    if name not in tensors:
        raise DataError(f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); expected exactly "
                        "one tensor, or one named 'activations'")
    info = tensors[name]
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise DataError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; allowed: "
                        f"{', '.join(_SAFETENSORS_DTYPES)} ({_ALLOWED_DTYPES})")
    shape = tuple(info.get("shape", ()))
    _check_shape(path, shape, f"tensor {name!r}")
    begin, end = info.get("data_offsets", (0, -1))
    offset = 8 + header_len + begin
    if end - begin != shape[0] * shape[1] * np.dtype(dtype).itemsize or 8 + header_len + end > size:
        raise DataError(f"{path}: tensor {name!r} data_offsets {[begin, end]} do not match its shape {shape} "
                        f"and dtype {info['dtype']} within a file of {size} bytes (truncated file?)")
    return _Shard(path, np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), bf16=dtype is np.uint16)


def _open_parquet(path: str) -> _Shard:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable .parquet file ({e})") from None
    types = table.schema.types
    if table.num_columns == 1 and (pa.types.is_list(types[0]) or pa.types.is_large_list(types[0])
                                   or pa.types.is_fixed_size_list(types[0])):
        name, column = table.column_names[0], table.column(0)
        if not pa.types.is_floating(types[0].value_type):
            raise DataError(f"{path}: column {name!r} holds {types[0]}; allowed: {_ALLOWED_PARQUET}")
        lengths = pc.list_value_length(column)
        low, high = (pc.min_max(lengths)[k].as_py() for k in ("min", "max"))
        if column.null_count or low != high:
            raise DataError(f"{path}: column {name!r} has null rows or lists of different lengths "
                            f"({low} to {high}); every row must be a list of the same length")
        values = pc.list_flatten(column)
        if values.null_count:
            raise DataError(f"{path}: column {name!r} has {values.null_count} null values")
        shape = (table.num_rows, low or 0)
        _check_shape(path, shape)
        return _Shard(path, values.to_numpy().astype(np.float32).reshape(shape))
    bad = [f"{n!r} ({t})" for n, t in zip(table.column_names, types) if not pa.types.is_floating(t)]
    if bad:
        raise DataError(f"{path}: non-float columns {', '.join(bad)}; allowed: {_ALLOWED_PARQUET}")
    _check_shape(path, (table.num_rows, table.num_columns), "table")
    nulls = [n for n, c in zip(table.column_names, table.columns) if c.null_count]
    if nulls:
        raise DataError(f"{path}: columns {', '.join(map(repr, nulls))} have null values")
    data = np.empty((table.num_rows, table.num_columns), np.float32)
    for j, column in enumerate(table.columns):
        data[:, j] = column.to_numpy()
    return _Shard(path, data)


_OPENERS = {".npy": _open_npy, ".safetensors": _open_safetensors, ".parquet": _open_parquet}


def expand_paths(paths) -> list[str]:
    """Files named or matched by each entry, each glob's matches sorted."""
    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = []
    for entry in map(str, entries):
        if any(c in entry for c in "*?["):
            matches = sorted(m for m in glob.glob(entry, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"{entry}: the pattern matched no files")
            files += matches
        elif os.path.isdir(entry):
            raise DataError(f"{entry}: is a directory; give a file or a glob pattern such as {entry}/*.npy")
        elif not os.path.isfile(entry):
            raise DataError(f"{entry}: file not found")
        else:
            files.append(entry)
    if not files:
        raise DataError("FileSource: no activation files given")
    return files


def _open(path: str) -> _Shard:
    suffix = Path(path).suffix.lower()
    if suffix not in _OPENERS:
        raise DataError(f"{path}: unknown suffix {suffix!r}; allowed: {', '.join(_OPENERS)}")
    return _OPENERS[suffix](path)


class FileSource(ActivationSource):
    """Rows of activation files concatenated in order, split into a fixed held-out eval set and a training
    stream of endless epochs, epoch e being a permutation of the training rows seeded by (seed, e)."""

    def __init__(self, paths, n_eval: int = 8192, seed: int = 0, eval_paths=None, shuffle_buffer: int | None = None):
        """eval_paths: files holding the held-out set (all their rows); then every row of `paths` trains and
        n_eval is ignored. Otherwise n_eval rows of `paths` are held out.
        shuffle_buffer: bound the shuffle to windows of this many rows, for data larger than memory (see
        `_epoch_order`); None: each epoch is a full permutation."""
        check_arg(is_int(n_eval) and n_eval >= 1, "n_eval", "an integer >= 1", n_eval)
        check_arg(is_int(seed) and seed >= 0, "seed", "an integer >= 0", seed)
        check_arg(shuffle_buffer is None or (is_int(shuffle_buffer) and shuffle_buffer >= 1), "shuffle_buffer",
                  "an integer >= 1 or None", shuffle_buffer)
        self.seed, self.shuffle_buffer = int(seed), shuffle_buffer
        self._shards = [_open(path) for path in expand_paths(paths)]
        self._eval_shards = [_open(path) for path in expand_paths(eval_paths)] if eval_paths is not None else []
        first = self._shards[0]
        for shard in self._shards[1:] + self._eval_shards:
            if shard.data.shape[1] != first.data.shape[1]:
                raise DataError(f"{shard.path}: d_in {shard.data.shape[1]} differs from d_in "
                                f"{first.data.shape[1]} of {first.path}; all files must have the same d_in")
        self.d_in = first.data.shape[1]
        self._starts = np.cumsum([0] + [len(shard.data) for shard in self._shards])
        self.n_rows = int(self._starts[-1])
        self._eval: torch.Tensor | None = None
        if self._eval_shards:
            self._eval = torch.cat([s.take(np.arange(len(s.data))) for s in self._eval_shards])
            self._eval_rows = np.empty(0, np.int64)
        else:
            if self.n_rows < n_eval + 1:
                more = f" (and {len(self._shards) - 1} more files)" if len(self._shards) > 1 else ""
                raise DataError(f"{first.path}{more}: {self.n_rows} rows in total, but n_eval={n_eval} needs at "
                                f"least {n_eval + 1} (the held-out rows plus one training row)")
            self._eval_rows = np.sort(np.random.default_rng(_SPLIT_SEED).choice(self.n_rows, n_eval, replace=False))
        self._train_rows = np.delete(np.arange(self.n_rows), self._eval_rows)
        self.n_train = len(self._train_rows)
        self._stream = EpochStream(self.n_train, self._epoch_order)

    @property
    def n_bytes(self) -> int:
        return sum(s.data.nbytes for s in self._shards + self._eval_shards)

    def check_finite(self, chunk_bytes: int = SCAN_CHUNK_BYTES) -> None:
        """Refuse nan or inf anywhere in the files, naming the file and the first row holding one: met in
        training, it would read as a diverged run or a nan metric, far from its cause. Reads every file
        once, chunk_bytes at a time."""
        for shard in self._shards + self._eval_shards:
            shard.check_finite(chunk_bytes)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The training rows in epoch `epoch`'s order. With a shuffle_buffer W: blocks of W/8 contiguous rows
        in a random order, then rows shuffled within each window of W consecutive positions. A window draws
        from at most 9 blocks, so a batch's reads are near-sequential and only about W rows of the data need
        be resident; vectors still mix across the whole file over an epoch, and any position stays
        computable (exact resume)."""
        rng = np.random.default_rng([self.seed, epoch])
        rows, window = self._train_rows, self.shuffle_buffer
        if window is None or window >= len(rows):
            return rng.permutation(rows)
        block = max(1, window // 8)
        order = np.concatenate([rows[s:s + block] for s in rng.permutation(np.arange(0, len(rows), block))])
        for lo in range(0, len(order), window):
            rng.shuffle(order[lo:lo + window])
        return order

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]  # sorted reads are much faster on a memmap
        cuts = np.searchsorted(ordered, self._starts)
        out = torch.empty(len(rows), self.d_in)
        dest = torch.from_numpy(order)
        for shard, start, a, b in zip(self._shards, self._starts, cuts[:-1], cuts[1:]):
            if b > a:
                out[dest[a:b]] = shard.take(ordered[a:b] - start)
        return out

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self._gather(self._stream.rows_at(step * batch_size, batch_size))

    def eval_set(self) -> torch.Tensor:
        if self._eval is None:
            self._eval = self._gather(self._eval_rows)
        return self._eval
