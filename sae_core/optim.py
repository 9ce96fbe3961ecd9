"""Adam for parameters whose gradients may be row-sparse (the TopK path's weight gradients, see
kernels/sparse_rows.py), giving what torch's Adam gives on the dense equivalent: a row without gradient
still decays its moments and still moves.

A dense gradient goes straight to torch's functional Adam (fused where the device has a fused kernel). A
row-sparse one is applied in row blocks of ROW_BLOCK_ENTRIES: the block's gradient is densified into one
reusable buffer and the same functional Adam updates the block's views of the parameter and its moments,
so no dense [n, d] gradient ever exists (3 GiB per weight at n = 2^20, d = 768). The state keeps torch's
names (step, exp_avg, exp_avg_sq), which resampling and checkpoints read.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.optim.adam import adam

from sae_core.parallel.mesh import TRIVIAL, Mesh

ROW_BLOCK_ENTRIES = 2**24  # 64 MiB of fp32 gradient densified at a time


def row_sparse_parts(g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows, values) of a gradient: sorted unique rows and their summed values for a sparse COO
    gradient; rows None for a dense one, whose values are the tensor itself."""
    if not g.is_sparse:
        return None, g
    if not g.is_coalesced():
        # autograd drops the coalesced flag when it stores a gradient; a single kernel's gradient is still
        # sorted and unique, and checking that is far cheaper than coalescing (a sort and a copy of the values)
        rows = g._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, g._values()
    g = g.coalesce()
    return g.indices()[0], g.values()


def _blocks(p: torch.Tensor, g: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, dense gradient of those rows) covering every row of p."""
    rows, vals = row_sparse_parts(g)
    if rows is None or rows.numel() == p.shape[0]:  # unique and complete: the values are the dense gradient
        yield slice(None), vals.view_as(p)
        return
    n, width = p.shape[0], max(1, p[0].numel())
    per = max(1, ROW_BLOCK_ENTRIES // width)
    buffer = torch.empty((min(per, n), *p.shape[1:]), dtype=p.dtype, device=p.device)
    starts = list(range(0, n, per))
    bounds = torch.searchsorted(rows, torch.tensor(starts + [n], device=rows.device)).tolist()
    for i, start in enumerate(starts):
        stop = min(n, start + per)
        block = buffer[: stop - start].zero_()
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            block.index_copy_(0, rows[lo:hi] - start, vals[lo:hi].to(p.dtype))
        yield slice(start, stop), block


class Adam(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                before = float(state["step"])
                state["step"] = torch.tensor(before + 1)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                fused = p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64,
                                                                          torch.float16, torch.bfloat16)
                for rows, g in _blocks(p, p.grad):
                    # the functional API counts the step itself: hand each block its own counter
                    counter = torch.tensor(before, dtype=torch.float32, device=p.device if fused else "cpu")
                    adam([p[rows]], [g], [m[rows]], [v[rows]], [], [counter], fused=fused, amsgrad=False,
                         beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0, eps=group["eps"],
                         maximize=False)


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, shared: Iterable[torch.nn.Parameter] = (),
                   mesh: Mesh = TRIVIAL) -> float:
    """torch.nn.utils.clip_grad_norm_ for dense and row-sparse gradients alike; returns the total norm.
    params are split over the mesh's shards (their squared norms are summed over shards), `shared` ones are
    whole on every shard (counted once)."""
    params, shared = [p for p in params if p.grad is not None], [p for p in shared if p.grad is not None]

    def sq(ps):
        return sum((torch.linalg.vector_norm(row_sparse_parts(p.grad)[1]).double() ** 2 for p in ps),
                   torch.zeros((), dtype=torch.float64))
    total = float(mesh.reduce_(sq(params).reshape(1).cpu(), "shards") + sq(shared).cpu()) ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p in params + shared:
            p.grad.mul_(coef)
    return total
