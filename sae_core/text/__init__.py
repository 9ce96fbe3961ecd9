"""Text for the activation pipeline: documents (files, a `datasets` dataset or the embedded corpus), packed
into fixed-length token rows (Gao et al.; Lawson et al. appendix A) and cached under `cache_root()`."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SAE_SCALING_CACHE if set, else ~/.cache/sae-scaling."""
    env = os.environ.get("SAE_SCALING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae-scaling"


from sae_core.text.documents import TextSpec, iter_documents, parse_text_spec  # noqa: E402  (they use cache_root)
from sae_core.text.embedded import embedded_corpus_path, embedded_documents  # noqa: E402
from sae_core.text.tokens import (  # noqa: E402
    check_context_length, pack_tokens, special_mask, token_rows,
)

__all__ = [
    "TextSpec", "cache_root", "check_context_length", "embedded_corpus_path", "embedded_documents",
    "iter_documents", "pack_tokens", "parse_text_spec", "special_mask", "token_rows",
]
