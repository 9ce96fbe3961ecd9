"""Text for the activation pipeline: documents (files, a `datasets` dataset or the embedded corpus), packed
into fixed-length token rows (Gao et al.; Lawson et al. appendix A) and cached under `cache_root()`."""
from __future__ import annotations

from sae_core.cache_dir import cache_root
from sae_core.text.documents import TextSpec, iter_documents, parse_text_spec
from sae_core.text.embedded import embedded_corpus_path, embedded_documents
from sae_core.text.tokens import check_context_length, pack_tokens, special_mask, token_rows

__all__ = [
    "TextSpec", "cache_root", "check_context_length", "embedded_corpus_path", "embedded_documents",
    "iter_documents", "pack_tokens", "parse_text_spec", "special_mask", "token_rows",
]
