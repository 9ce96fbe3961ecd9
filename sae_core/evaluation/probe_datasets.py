"""User-supplied binary tasks for the probe loss (Gao et al. 2024, §4), given in `eval.probe_tasks`.

Each task is a table read from a local .jsonl, .csv or .parquet file (`path`) or a `datasets` dataset (`dataset`:
a folder written by `save_to_disk`, else a hub id, which needs the network), the first `max_examples` rows:

- level: sequence. `text_column` holds a text, `label_column` its label: 0, 1, true or false. A latent's value
  for the sequence is its maximum over the sequence's probed tokens. This is our choice: Gao et al.'s probe
  tasks are sequence classifications, but neither the paper's text we could read nor the public code
  (openai/sparse_autoencoder) says how they pool tokens. The maximum keeps a latent that fires on one telling
  token as strong as one that fires everywhere, where a mean would dilute it by the sequence's length.
- level: token. `label_column` holds a list of [start, end) character spans of the text; a token is positive
  when its character offsets (the fast tokenizer's `return_offsets_mapping`) overlap a span.

Texts are tokenised with the model's tokenizer (its own special tokens added, as an encoder expects them),
truncated to the sweep's context length and right-padded; padding, special tokens and the first `drop_first`
positions of each text (as in the held-out rows, whose anomalous leading positions the SAE never saw) are not
probed. CSV cells other than the text are read as JSON (`1`, `true`, `[[0, 5]]`).

Every problem is a DataError naming the task, the file and the key: a missing file or column, a label other
than 0/1, a malformed span, and a task whose positives are under 1% or over 99% of the probed sequences or
tokens (probe_tasks.MIN_RATE; a built-in task like that is skipped instead, a user's was asked for).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_core.errors import DataError
from sae_core.evaluation.probe_tasks import MIN_RATE
from sae_core.text.tokens import special_ids

SUFFIXES = (".jsonl", ".csv", ".parquet")
LABELS = "0, 1, true, false"
SPANS = "a list of [start, end) character spans, 0 <= start < end"


class ProbeTaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)  # the task's name in the probes table
    path: str | None = None  # a local .jsonl, .csv or .parquet file
    dataset: str | None = None  # a `datasets` folder written by save_to_disk, or a hub id (needs the network)
    split: str = "train"  # the dataset's split
    text_column: str = "text"  # the column holding each example's text
    label_column: str = "label"  # sequence: 0/1 (or bool); token: a list of [start, end) positive character spans
    level: Literal["token", "sequence"]  # a label per token (from character spans) or per text
    max_examples: int = Field(2048, ge=1)  # the first rows read

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path (a .jsonl, .csv or .parquet file) and dataset")
        if "split" in self.model_fields_set and self.dataset is None:
            raise ValueError("split applies only to dataset, not to path")
        return self

    @property
    def source(self) -> str:
        return self.path or self.dataset

    def where(self, key: str) -> str:
        """`eval.probe_tasks[name].key (file)`: how every message names the task, the key and the file."""
        return f"eval.probe_tasks[{self.name}].{key} ({self.source})"


class ProbeSet:
    """Token rows to run through the model and the binary tasks labelled on them.

    key: names the set in the evaluator's caches (the spec, or "builtin"); source: "builtin" or the file or
    dataset; level: token or sequence; tokens, keep: [R, T] (keep: the probed positions); attention: [R, T] bool, None when every position is
    text; labels: task -> [n] floats, one per probed position in row-major order (token level) or per row."""

    def __init__(self, key, source: str, level: str, tokens: torch.Tensor, keep: torch.Tensor,
                 labels: dict[str, torch.Tensor], attention: torch.Tensor | None = None):
        self.key, self.source, self.level = key, source, level
        self.tokens, self.keep, self.labels, self.attention = tokens, keep, labels, attention


def read_rows(spec: ProbeTaskSpec) -> list[dict]:
    """The first max_examples rows, each {text_column: str, label_column: value}."""
    rows = _read_dataset(spec) if spec.dataset is not None else _read_file(spec)
    for i, row in enumerate(rows):
        for key in ("text_column", "label_column"):
            column = getattr(spec, key)
            if column not in row:
                raise DataError(f"{spec.where(key)}: row {i}: no column {column!r}; allowed: {', '.join(row)}")
        if not isinstance(row[spec.text_column], str):
            raise DataError(f"{spec.where('text_column')}: row {i}: a {type(row[spec.text_column]).__name__}; "
                            "allowed: a string")
    if not rows:
        raise DataError(f"{spec.where('path' if spec.path else 'dataset')}: no rows")
    return rows


def _read_file(spec: ProbeTaskSpec) -> list[dict]:
    path = Path(spec.path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{spec.where('path')}: suffix {suffix or '(none)'!r} is not supported; "
                        f"allowed: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{spec.where('path')}: no such file; allowed: a {', '.join(SUFFIXES)} file")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
            return table.slice(0, spec.max_examples).to_pylist()
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                return [{k: v if k == spec.text_column else _json_cell(v) for k, v in row.items()}
                        for _, row in zip(range(spec.max_examples), csv.DictReader(f))]
            lines = (line for line in f if line.strip())
            return [_json_row(spec, n, line) for n, line in zip(range(spec.max_examples), lines)]
    except (OSError, UnicodeDecodeError, ValueError) as err:  # pyarrow's errors are OSError / ValueError
        raise DataError(f"{spec.where('path')}: could not be read ({err})") from None


def _json_cell(cell: str):
    try:
        return json.loads(cell)
    except ValueError:
        return cell


def _json_row(spec: ProbeTaskSpec, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise DataError(f"{spec.where('path')}: row {n}: not valid JSON ({err})") from None
    if not isinstance(row, dict):
        raise DataError(f"{spec.where('path')}: row {n}: a JSON {type(row).__name__}; allowed: an object")
    return row


def _read_dataset(spec: ProbeTaskSpec) -> list[dict]:
    import datasets  # about a second to import: only when a dataset is asked for

    local = Path(spec.dataset).expanduser()
    try:
        if local.exists():
            data = datasets.load_from_disk(str(local))
        else:
            data = datasets.load_dataset(spec.dataset, split=spec.split)
    except (OSError, ValueError) as err:  # offline and not cached, or not a saved dataset
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{spec.where('dataset')}: could not be read ({first}); allowed: a folder written by "
                        "save_to_disk, or a hub id (needs the network)") from None
    if isinstance(data, datasets.DatasetDict):
        if spec.split not in data:
            raise DataError(f"{spec.where('split')}: {spec.split!r} is not a split; allowed: {', '.join(data)}")
        data = data[spec.split]
    return data.select(range(min(spec.max_examples, len(data)))).to_list()


def _label(spec: ProbeTaskSpec, i: int, value) -> bool:
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{spec.where('label_column')}: row {i}: label {value!r}; allowed: {LABELS}")


def _spans(spec: ProbeTaskSpec, i: int, value) -> list[tuple[int, int]]:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in s) and 0 <= s[0] < s[1] for s in value)
    if not ok:
        raise DataError(f"{spec.where('label_column')}: row {i}: {value!r}; allowed: {SPANS}")
    return [tuple(s) for s in value]


def load_task(spec: ProbeTaskSpec, tokenizer, context_length: int, drop_first: int = 0,
              max_tokens: int | None = None) -> ProbeSet:
    """The task's rows tokenised and labelled (see the module doc). Token level: at most `max_tokens` probed
    positions, the first ones."""
    rows = read_rows(spec)
    token_level = spec.level == "token"
    if token_level and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{spec.where('level')}: token-level tasks need a fast tokenizer (character offsets); "
                        f"{type(tokenizer).__name__} is not; allowed here: sequence")
    found = [_spans(spec, i, r[spec.label_column]) if token_level else _label(spec, i, r[spec.label_column])
             for i, r in enumerate(rows)]
    enc = tokenizer([r[spec.text_column] for r in rows], truncation=True, max_length=context_length,
                    return_offsets_mapping=token_level, verbose=False)
    width = max(len(ids) for ids in enc["input_ids"])
    tokens = np.zeros((len(rows), width), dtype=np.int64)  # pad id 0: masked out, never probed
    attention = np.zeros((len(rows), width), dtype=bool)
    positive = np.zeros((len(rows), width), dtype=bool)
    for i, ids in enumerate(enc["input_ids"]):
        tokens[i, :len(ids)], attention[i, :len(ids)] = ids, True
        if token_level:
            for t, (a, b) in enumerate(enc["offset_mapping"][i]):
                positive[i, t] = a < b and any(a < e and s < b for s, e in found[i])
    keep = attention & ~np.isin(tokens, special_ids(tokenizer))
    keep[:, :drop_first] = False
    if token_level and max_tokens is not None:
        keep &= (np.cumsum(keep.reshape(-1)) <= max_tokens).reshape(keep.shape)
        used = keep.any(axis=1)
        tokens, attention, keep, positive = tokens[used], attention[used], keep[used], positive[used]
    elif not token_level:
        empty = np.flatnonzero(~keep.any(axis=1))
        if len(empty):
            raise DataError(f"{spec.where('text_column')}: row {int(empty[0])}: no token left to probe (empty, "
                            f"or only special tokens and the first {drop_first} positions); allowed: a non-empty text")
    y = positive[keep] if token_level else np.array(found, dtype=bool)
    rate = float(y.mean()) if len(y) else 0.0
    if not MIN_RATE <= rate <= 1 - MIN_RATE:
        what = "probed tokens" if token_level else "sequences"
        raise DataError(f"{spec.where('label_column')}: {rate:.2%} of the {len(y)} {what} are positive; allowed: "
                        f"between {MIN_RATE:.0%} and {1 - MIN_RATE:.0%}")
    return ProbeSet(spec, spec.source, spec.level, torch.from_numpy(tokens), torch.from_numpy(keep),
                    {spec.name: torch.from_numpy(y).float()}, torch.from_numpy(attention))
