"""Document sources for the sweep's `data.text`, exactly one of:

  files: "corpus/*.txt"     a glob or a list of globs (each one's matches sorted): .txt = one document per
                            file, .jsonl = one per line (its `field`), .parquet = one per row (column `field`)
  dataset: NAME-OR-PATH     Hugging Face `datasets`: a folder written by `save_to_disk`, a local .json/.jsonl/
                            .parquet file or a folder of data files (all read offline), or a hub id
                            (`load_dataset(name, config, split=, streaming=)`); `field` names the text column
  embedded: true            the docstring corpus of sae_core.text.embedded (no download)

`field` (default "text") applies to files and dataset; `split` (default "train"), `streaming` (default true)
and `config` to dataset only.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from sae_core import fingerprint
from sae_core.errors import DataError, validate
from sae_core.text.embedded import embedded_corpus_key, embedded_documents

SUFFIXES = (".txt", ".jsonl", ".parquet")
_SOURCES = ("files", "dataset", "embedded")
_ONLY_FOR = {"field": ("files", "dataset"), "split": ("dataset",), "streaming": ("dataset",), "config": ("dataset",)}
_DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class TextSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: str | list[str] | None = None  # .txt (one document each), .jsonl (one per line) or .parquet; globs
    dataset: str | None = None  # a Hugging Face `datasets` name (from the local cache) or a local folder or file
    embedded: bool = False  # the docstrings of the installed Python packages: no download
    field: str = "text"  # the text column of .jsonl, .parquet or a dataset
    split: str = "train"  # the dataset's split
    streaming: bool = True  # read the dataset without materialising it
    config: str | None = None  # the dataset's configuration name

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in _SOURCES if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of files, dataset, embedded: true (got {', '.join(given) or 'none'})")
        for key, sources in _ONLY_FOR.items():
            if key in self.model_fields_set and given[0] not in sources:
                raise ValueError(f"{key} applies only to {' and '.join(sources)}, not to {given[0]}")
        return self

    def source(self) -> str:
        return next(k for k in _SOURCES if getattr(self, k))

    def local_fingerprint(self) -> str | None:
        """The content of the local files this text reads (sae_core.fingerprint: matched files in order, a
        local dataset file or folder); None for the embedded corpus and a hub dataset."""
        if self.files:
            return fingerprint.paths_fingerprint(expand_files(self.files))
        if self.dataset and Path(self.dataset).expanduser().exists():
            return fingerprint.local_fingerprint(Path(self.dataset).expanduser())
        return None

    def key(self) -> str:
        """A stable string naming the data, for cache keys: the fields plus a fingerprint of what is on disk
        (the local files' content, see local_fingerprint; the embedded corpus's own key). A hub dataset is
        named by its fields alone."""
        fields = self.model_dump(mode="json")
        if self.embedded:
            fields["fingerprint"] = embedded_corpus_key()
        elif (local := self.local_fingerprint()) is not None:
            fields["fingerprint"] = local
        return json.dumps(fields, sort_keys=True)


def parse_text_spec(data: dict | TextSpec, source: str = "config", prefix: str = "data.text") -> TextSpec:
    return validate(TextSpec, data, source, prefix)


def expand_files(patterns: str | list[str]) -> list[str]:
    """Every file matched, each pattern's matches sorted; a pattern matching nothing or a file of another
    kind fails before any document is read."""
    files = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(f"data.text.files: {pattern!r} matched no files")
        for path in matches:
            if Path(path).suffix.lower() not in SUFFIXES:
                raise DataError(f"data.text.files: {path}: suffix {Path(path).suffix or '(none)'!r} is not "
                                f"supported; allowed: {', '.join(SUFFIXES)}")
        files += matches
    return files


def iter_documents(text: dict | TextSpec) -> Iterator[str]:
    """The documents of `data.text`, in a fixed order. Checks the spec (and for files, every match) at once."""
    spec = parse_text_spec(text)
    if spec.embedded:
        return embedded_documents()
    if spec.dataset:
        return _dataset_documents(spec)
    return _file_documents(expand_files(spec.files), spec.field)


def _file_documents(files: list[str], field: str) -> Iterator[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    for path in files:
        try:
            yield from readers[Path(path).suffix.lower()](path, field)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_txt(path: str, field: str) -> Iterator[str]:
    yield Path(path).read_text(encoding="utf-8")


def _read_jsonl(path: str, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or field not in row:
                found = f"its fields: {', '.join(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
                raise DataError(f"{path}: line {number}: no field {field!r} ({found}); "
                                "set data.text.field to the field that holds the text")
            if not isinstance(row[field], str):
                raise DataError(f"{path}: line {number}: field {field!r} is {type(row[field]).__name__}, "
                                "not a string")
            yield row[field]


def _read_parquet(path: str, field: str) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); "
                        "set data.text.field to the column that holds the text")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} has type {kind}; allowed: string")
    for batch in parquet.iter_batches(columns=[field]):
        column = batch.column(0)
        if column.null_count:
            raise DataError(f"{path}: column {field!r} has {column.null_count} null rows; every row must hold text")
        yield from column.to_pylist()


def _dataset_documents(spec: TextSpec) -> Iterator[str]:
    import datasets  # about a second to import: only when a dataset is asked for

    name, local = spec.dataset, Path(spec.dataset).expanduser()
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if spec.split not in data:
                    raise DataError(f"data.text.split: {spec.split!r} is not a split of {name}; "
                                    f"allowed: {', '.join(data)}")
                data = data[spec.split]
        elif local.is_file():
            if local.suffix.lower() not in _DATASET_BUILDERS:
                raise DataError(f"data.text.dataset: {name}: suffix {local.suffix!r} is not supported; "
                                f"allowed: {', '.join(_DATASET_BUILDERS)}, or a folder")
            data = datasets.load_dataset(_DATASET_BUILDERS[local.suffix.lower()], data_files=str(local),
                                         split=spec.split, streaming=spec.streaming)
        elif local.is_dir():  # data files; `datasets` names the splits from the file names (train.jsonl, ...)
            data = datasets.load_dataset(str(local), split=spec.split, streaming=spec.streaming)
        else:
            data = _hub_dataset(datasets, spec)
    except (OSError, ValueError) as err:
        raise DataError(f"data.text.dataset: {name}: could not be read ({_first_line(err)})") from None
    columns = data.column_names
    if columns is not None:
        if spec.field not in columns:
            raise DataError(f"data.text.field: {spec.field!r} is not a column of {name}; columns: {', '.join(columns)}")
        data = data.select_columns([spec.field])
    for number, row in enumerate(data):
        value = row.get(spec.field)
        if not isinstance(value, str):
            raise DataError(f"data.text.dataset: {name}: row {number}: field {spec.field!r} is "
                            f"{type(value).__name__}, not a string")
        yield value


def _hub_dataset(datasets, spec: TextSpec):
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=spec.streaming)
    except OSError as err:  # offline, unreachable or not cached (ConnectionError, FileNotFoundError)
        raise DataError(
            f"data.text.dataset: {spec.dataset!r} is not on disk and could not be loaded from the hub "
            f"({_first_line(err)}). On a machine with network, save it with `datasets.load_dataset(...)"
            ".save_to_disk(DIR)` and set data.text.dataset: DIR (a local folder), or point data.text.files "
            "at .txt/.jsonl/.parquet files") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
