"""Dynamic loss scaling for fp16 autocast, as torch's GradScaler does it (start at 2^16, halve and skip the
step on a non-finite gradient, double after 2000 finite steps), with two differences that sharded training
needs: every rank agrees on whether the step is finite (a shard that skipped while the others stepped would
leave the SAE inconsistent), and the scale lives in the trainer's checkpoint, so a resumed run keeps it."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from sae_core.checkpoint import TrainerState
from sae_core.optim import row_sparse_parts
from sae_core.parallel.mesh import Mesh

INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


def unscale_and_update(params: Iterable[torch.nn.Parameter], state: TrainerState, mesh: Mesh) -> bool:
    """Divide the gradients by the scale; whether they are finite on every rank. Updates the scale."""
    inv = 1.0 / state.loss_scale
    bad = torch.zeros((), dtype=torch.bool)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(inv)
            bad |= ~torch.isfinite(row_sparse_parts(p.grad)[1]).all().cpu()
    finite = mesh.all_true(not bool(bad))
    if finite:
        state.loss_scale_good_steps += 1
        if state.loss_scale_good_steps == GROWTH_INTERVAL:
            state.loss_scale, state.loss_scale_good_steps = state.loss_scale * 2, 0
    else:
        state.loss_scale, state.loss_scale_good_steps = state.loss_scale / 2, 0
    return finite
