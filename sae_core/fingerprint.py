"""Content fingerprints of local inputs (activation files, text files, model folders), cheap for large ones.

A file of at most WHOLE_FILE_BYTES is hashed whole. A larger one is hashed by its size and SAMPLE_BLOCKS
blocks of BLOCK_BYTES at evenly spaced offsets, the first and the last block among them: a multi-GB file
costs SAMPLE_BLOCKS x BLOCK_BYTES (4 MiB) of reads, milliseconds, however large it is.

What sampling cannot see: an edit of a large file that keeps its size and touches none of the sampled
blocks leaves its fingerprint as it was, so the runs identified by it still count as done and the caches
keyed by it are reused. A replaced file (other vectors, re-saved weights, another corpus) differs almost
everywhere and is seen; a few bytes patched in place may not be. After such an edit, give the file a new
name and point the sweep at it (the path is part of a run's identity and of the cache keys), or change
data_seed, which makes every run new (an activation cache built from an edited model or text is then
still reused: delete its folder under the cache root).

Every fingerprint is content only: the same bytes at another path give the same digest, since the path
is already named by the sweep wherever it matters.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

WHOLE_FILE_BYTES = 32 * 2**20
SAMPLE_BLOCKS = 64
BLOCK_BYTES = 64 * 2**10
_READ_BYTES = 2**20
_DIGEST_CHARS = 16


def _short(h) -> str:
    return h.hexdigest()[:_DIGEST_CHARS]


def sample_offsets(size: int) -> list[int]:
    """Where the sampled blocks of a file of `size` bytes (> WHOLE_FILE_BYTES) start."""
    last = size - BLOCK_BYTES
    return [round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)]


def file_fingerprint(path: str | Path) -> str:
    """16 hex digits naming the file's content: sha256 of it whole, or of its size and sampled blocks when
    larger than WHOLE_FILE_BYTES (see the module docstring for what sampling misses)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            h = hashlib.sha256(b"whole\n")
            while chunk := f.read(_READ_BYTES):
                h.update(chunk)
            return _short(h)
        # the scheme and the size go in first: two files of different sizes never share a digest, and a
        # change of the block layout here can never be mistaken for the old one's digests
        h = hashlib.sha256(f"sampled {SAMPLE_BLOCKS}x{BLOCK_BYTES} of {size}\n".encode())
        for offset in sample_offsets(size):
            f.seek(offset)
            h.update(f.read(BLOCK_BYTES))
        return _short(h)


def paths_fingerprint(paths: Iterable[str | Path]) -> str:
    """The files' contents in the given order (the order in which a source reads them, so reordering
    counts as a change); their names are left out."""
    return _short(hashlib.sha256(json.dumps([file_fingerprint(p) for p in paths]).encode()))


def folder_files(folder: str | Path) -> list[str]:
    """Every non-hidden file under the folder (relative POSIX names, sorted), hidden folders skipped: tools
    keep their own bookkeeping there (.git, the hub client's .cache/huggingface with download times)."""
    root = Path(folder)
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(here) / name
            if not name.startswith(".") and path.is_file():  # a link to a file counts: hub snapshots are links
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def folder_fingerprint(folder: str | Path) -> str:
    """A folder (e.g. what save_pretrained writes) by each file's relative name and content: adding,
    removing, renaming or changing any file changes it; moving the whole folder does not."""
    root = Path(folder)
    entries = [[name, file_fingerprint(root / name)] for name in folder_files(root)]
    return _short(hashlib.sha256(json.dumps(entries).encode()))


def local_fingerprint(path: str | Path) -> str:
    """A file's or a folder's fingerprint, whichever `path` is."""
    return folder_fingerprint(path) if Path(path).is_dir() else file_fingerprint(path)
