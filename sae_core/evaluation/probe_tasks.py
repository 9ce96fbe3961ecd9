"""Built-in binary token-level tasks for the probe loss (Gao et al. 2024, §4), derived from the tokenizer's
token strings over the held-out token rows, so they need no download and work with any model and text.

A token's string is what it reads as in text: WordPiece's continuation mark `##` and byte-level BPE's space
marker decoded away (`tokenizer.convert_tokens_to_string`); special tokens (CLS, SEP, BOS, ...) read as "".

- digit: the token contains a decimal digit.
- capitalised: the token, stripped, starts with an uppercase letter.
- python_keyword: the token, stripped, is a Python keyword (`keyword.kwlist`).
- punctuation: the token, stripped, is non-empty and made only of ASCII punctuation.
- doctest: the token follows a `>>>` prompt in the same document of the row (no separator in between); the
  prompt may be one token or several (MiniLM splits it into three `>`).

A task whose base rate on the probed positions is below 1% or above 99% is skipped (a probe of it says little,
and a handful of positives makes the best of thousands of latents an overfit).

Base rates measured on the quickstart data (embedded MiniLM, uncased, so its tokens have no capitals; the
4130 held-out positions of the rows holding eval.probe_tokens = 4096 of the embedded docstring corpus):
digit 4.6%, capitalised 0.0% (skipped), python_keyword 9.0%, punctuation 29.4%, doctest 9.6%.

User-supplied tasks, token- or sequence-level, come from `eval.probe_tasks` (sae_core.evaluation.probe_datasets).
There is no built-in sequence-level task: the embedded corpus keeps each docstring's text alone, not the module
it comes from, so a "which package" label cannot be derived from it.
"""
from __future__ import annotations

import keyword
import string
from collections.abc import Callable

import numpy as np

MIN_RATE = 0.01  # tasks rarer than this, or more common than 1 - this, on the probed positions are skipped

_KEYWORDS = frozenset(keyword.kwlist)
_PUNCTUATION = frozenset(string.punctuation)


def token_strings(tokenizer, ids: np.ndarray) -> dict[int, str]:
    """The text each distinct id in `ids` reads as (see the module doc)."""
    special = set(tokenizer.all_special_ids)
    out = {}
    for i in np.unique(ids).tolist():
        if i in special:
            out[i] = ""
            continue
        tok = tokenizer.convert_ids_to_tokens(i)
        try:
            text = tokenizer.convert_tokens_to_string([tok])
        except Exception:  # a tokenizer without a decoder for single tokens: its raw piece is the best guess
            text = tok
        out[i] = text[2:] if tok.startswith("##") else text  # a lone piece keeps its WordPiece mark
    return out


def _per_token(test: Callable[[str], bool]) -> Callable[[list[list[str]]], np.ndarray]:
    return lambda rows: np.array([[test(s) for s in row] for row in rows], dtype=bool)


def _doctest(rows: list[list[str]]) -> np.ndarray:
    out = np.zeros((len(rows), len(rows[0]) if rows else 0), dtype=bool)
    for r, row in enumerate(rows):
        tail, inside = "", False
        for t, s in enumerate(row):
            if s == "":  # a separator (or other special token): a new document, outside any doctest
                tail, inside = "", False
                continue
            out[r, t] = inside
            tail = (tail + "".join(s.split()))[-3:]
            inside = inside or tail == ">>>"
    return out


TASKS: dict[str, Callable[[list[list[str]]], np.ndarray]] = {
    "digit": _per_token(lambda s: any(c.isdigit() for c in s)),
    "capitalised": _per_token(lambda s: s.strip()[:1].isupper()),
    "python_keyword": _per_token(lambda s: s.strip() in _KEYWORDS),
    "punctuation": _per_token(lambda s: bool(s.strip()) and all(c in _PUNCTUATION for c in s.strip())),
    "doctest": _doctest,
}


def task_labels(tokenizer, tokens: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Every task's labels [n] at the probed positions (tokens [R, T], positions [R, T] bool; row-major, the
    order of `acts[positions]`)."""
    strings = token_strings(tokenizer, tokens)
    rows = [[strings[i] for i in row] for row in np.asarray(tokens).tolist()]
    positions = np.asarray(positions, dtype=bool)
    return {name: task(rows)[positions] for name, task in TASKS.items()}


def usable(labels: dict[str, np.ndarray], min_rate: float = MIN_RATE) -> dict[str, np.ndarray]:
    """The tasks whose base rate lies within [min_rate, 1 - min_rate]."""
    return {name: y for name, y in labels.items() if len(y) and min_rate <= float(y.mean()) <= 1 - min_rate}
