"""Where the toolkit caches what it derives from inputs (token rows, the embedded corpus, activation caches)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SAE_SCALING_CACHE if set, else ~/.cache/sae-scaling."""
    env = os.environ.get("SAE_SCALING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae-scaling"
