"""Sparse kernels of the TopK-family training path: nothing B x n is built in backward."""
from sae_core.kernels.sparse_rows import rows_combine, rows_dot, rows_scatter
from sae_core.kernels.sparse_sae import sparse_decode, topk_encode

__all__ = ["rows_combine", "rows_dot", "rows_scatter", "sparse_decode", "topk_encode"]
