"""Sparse kernels of the TopK-family training path: nothing B x n is built in backward."""
from sae_core.kernels.sparse_rows import rows_combine, rows_dot, rows_scatter
from sae_core.kernels.topk_autograd import sparse_decode, topk_encode
from sae_core.kernels.topk_select import EXACT, Selection, resolve_selection

__all__ = ["EXACT", "Selection", "resolve_selection", "rows_combine", "rows_dot", "rows_scatter", "sparse_decode",
           "topk_encode"]
