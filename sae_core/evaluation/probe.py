"""Probe loss (Gao et al. 2024, §4): how well the single best latent predicts a binary task, of tokens (the
built-in tasks, probe_tasks.py, and the user's token-level ones) or of sequences (the user's, each latent's
value for a sequence its maximum over the tokens; probe_datasets.py).

For labels y over N token positions (or sequences) and latent values Z [N, n], every latent i gets a 1-D
logistic regression σ(w·z_i + b), fitted by Newton's method as in the paper; the probe loss of the task is the
smallest mean binary cross-entropy over latents. The fit is in-sample on the same positions (a 2-parameter model
on thousands of positions: the optimism of taking the best of n latents is small next to the differences between
SAEs).

- each latent is standardised (mean 0, std 1 over the positions) before fitting, so the light L2 penalty on w
  (`l2`, in standardised units) means the same for every latent whatever its scale; it keeps w finite when a
  latent separates the labels exactly. The reported loss is the cross-entropy alone, without the penalty.
- a constant latent (std 0) has z = 0 after standardising: only b is fitted, giving the label's entropy H(p),
  the loss of the best constant predictor.
- Newton steps on (w, b) are batched over latents in chunks of `chunk` columns (so 2^17 latents x 4096
  positions never materialise at once), with step halving whenever a full step does not lower the latent's
  penalised loss, and stop when every latent's Newton decrement is below `tol`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_core.evaluation.probe_datasets import ProbeSet, ProbeTaskSpec, load_task
from sae_core.evaluation.probe_tasks import task_labels, usable
from sae_core.lm import ActivationExtractor

_MAX_ELEMENTS = 1 << 22  # positions x latents per chunk: at most this many nonzeros held as (row, column, value)


@dataclass
class ProbeFit:
    losses: torch.Tensor  # [n] mean BCE of each latent's fitted probe (float64 on the CPU)
    best: int  # index of the latent with the smallest loss
    loss: float  # losses[best]


def entropy(p: float) -> float:
    """H(p) in nats: the loss of the best constant predictor of labels with base rate p."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


class _Columns:
    """A chunk of standardised columns stored sparsely: SAE latents are mostly exactly 0, and every 0 of a
    column has the same standardised value c0, so its terms of the sums are one count times one value. The
    cost of a Newton step is then O(nonzeros + columns), not O(N x columns)."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor):
        n_pos, self.c = z.shape
        self.n = float(n_pos)
        mean, std = z.mean(dim=0), z.std(dim=0, unbiased=False)
        const = std <= 1e-6 * mean.abs().clamp_min(1e-12)  # constant up to float rounding: no information in z
        std = torch.where(const, 1.0, std)
        rows, self.cols = z.nonzero(as_tuple=True)
        self.z = torch.where(const[self.cols], 0.0, (z[rows, self.cols] - mean[self.cols]) / std[self.cols])
        self.c0 = torch.where(const, 0.0, -mean / std)
        self.y = y[rows]
        nnz = torch.zeros(self.c, dtype=z.dtype, device=z.device).index_add_(0, self.cols, torch.ones_like(self.z))
        self.n0 = self.n - nnz  # zeros per column
        self.n0_pos = float(y.sum()) - self.sum(self.y)  # zeros per column whose label is 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.c, dtype=values.dtype, device=values.device).index_add_(0, self.cols, values)


def _objective(cols: _Columns, w: torch.Tensor, b: torch.Tensor, l2: float):
    """Mean BCE [c], penalised loss [c], gradient [c, 2] and Hessian [c, 2, 2] of the penalised loss in (w, b)."""
    z, c0, n0, n0_pos, n = cols.z, cols.c0, cols.n0, cols.n0_pos, cols.n
    s, s0 = z * w[cols.cols] + b[cols.cols], c0 * w + b
    # softplus(s) - y s = -log σ(±s), stable for large |s|
    bce = (cols.sum(F.softplus(s) - cols.y * s) + n0 * F.softplus(s0) - n0_pos * s0) / n
    pen = bce + 0.5 * l2 * w * w
    p, p0 = torch.sigmoid(s), torch.sigmoid(s0)
    r, r0 = p - cols.y, n0 * p0 - n0_pos
    v, v0 = p * (1 - p), n0 * p0 * (1 - p0)
    gb = (cols.sum(r) + r0) / n
    gw = (cols.sum(r * z) + c0 * r0) / n + l2 * w
    h1, vz = (cols.sum(v) + v0) / n, v * z
    hz, hzz = (cols.sum(vz) + c0 * v0) / n, (cols.sum(vz * z) + c0 * c0 * v0) / n + l2
    grad = torch.stack([gw, gb], dim=-1)
    hess = torch.stack([torch.stack([hzz, hz], -1), torch.stack([hz, h1], -1)], -2)
    return bce, pen, grad, hess


def _fit_chunk(z: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int, tol: float) -> torch.Tensor:
    z, y = z.double(), y.double()  # sums over thousands of positions: float64 keeps H(p) exact to 1e-6 and more
    cols = _Columns(z, y.reshape(-1))
    c = z.shape[1]
    rate = min(max(float(y.mean()), 1e-7), 1 - 1e-7)
    w = torch.zeros(c, dtype=z.dtype, device=z.device)
    b = torch.full((c,), math.log(rate / (1 - rate)), dtype=z.dtype, device=z.device)  # the constant optimum
    bce, pen, grad, hess = _objective(cols, w, b, l2)
    stuck = torch.zeros(c, dtype=torch.bool, device=z.device)
    for _ in range(max_iter):
        # the 2x2 Newton solve in closed form; a tiny ridge keeps it defined when p(1-p) underflows
        a, c_, d = hess[:, 0, 0], hess[:, 0, 1], hess[:, 1, 1] + 1e-12
        det = a * d - c_ * c_  # > 0: the penalised loss is strictly convex (a >= l2, d > 0)
        step = torch.stack([(d * grad[:, 0] - c_ * grad[:, 1]) / det, (a * grad[:, 1] - c_ * grad[:, 0]) / det], -1)
        decrement = (grad * step).sum(dim=-1)  # Newton decrement λ²: half of it estimates the loss still to gain
        active = (decrement > tol) & ~stuck
        if not bool(active.any()):
            break
        t, before = active.to(z.dtype), pen
        for _ in range(10):  # halve the step of each latent whose penalised loss would rise
            nw, nb = w - t * step[:, 0], b - t * step[:, 1]
            nbce, npen, ngrad, nhess = _objective(cols, nw, nb, l2)
            ok = (npen <= pen) & (t > 0)
            w, b = torch.where(ok, nw, w), torch.where(ok, nb, b)
            bce, pen = torch.where(ok, nbce, bce), torch.where(ok, npen, pen)
            grad = torch.where(ok[:, None], ngrad, grad)
            hess = torch.where(ok[:, None, None], nhess, hess)
            t = torch.where(ok, 0.0, t / 2)
            if not bool((t > 0).any()):
                break
        # no step lowered the loss: the latent is at its optimum up to rounding (float32), so stop trying it
        stuck |= active & ~(pen < before)
    return bce


@torch.no_grad()
def fit_probes(z: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, max_iter: int = 50, tol: float | None = None,
               chunk: int | None = None) -> ProbeFit:
    """Fit one 1-D logistic regression per column of z [N, n] to labels y [N] in {0, 1}; see the module doc.
    Computes in float64 on z's device."""
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"z must be [N, n] and y [N]; got {tuple(z.shape)} and {tuple(y.shape)}")
    y = y.to(z.dtype).reshape(-1, 1)
    # stop when less than tol / 2 of loss is left to gain: far below the 1e-4 the losses are compared at
    tol = tol if tol is not None else 1e-12
    chunk = chunk or max(1, _MAX_ELEMENTS // max(z.shape[0], 1))
    losses = [_fit_chunk(z[:, lo:lo + chunk].to(z.dtype), y, l2, max_iter, tol).double().cpu()
              for lo in range(0, z.shape[1], chunk)]
    out = torch.cat(losses)
    best = int(out.argmin())
    return ProbeFit(out, best, float(out[best]))


PROBE_COLUMNS = ("probe_loss", "probe_loss_baseline")


def _builtin_set(downstream, n_tokens: int) -> ProbeSet:
    """The built-in token tasks on the first `n_tokens` held-out positions."""
    tokens, keep = downstream.tokens, downstream.positions
    end = int(torch.searchsorted(keep.sum(dim=1).cumsum(0), n_tokens)) + 1  # the first rows holding n_tokens
    tokens, keep = tokens[:end], keep[:end].clone()
    keep &= (keep.reshape(-1).cumsum(0) <= n_tokens).reshape(keep.shape)
    labels = {k: torch.from_numpy(v).float()
              for k, v in usable(task_labels(downstream.lm.tokenizer, tokens.numpy(), keep.numpy())).items()}
    return ProbeSet("builtin", "builtin", "token", tokens, keep, labels)


def _probe_sets(downstream, n_tokens: int, tasks: tuple[ProbeTaskSpec, ...], builtin: bool) -> list[ProbeSet]:
    """The built-in set and each user task's, read and tokenised once per evaluator."""
    cache = downstream.__dict__.setdefault("_probe_sets", {})
    if (n_tokens, tasks, builtin) not in cache:
        # the held-out rows' leading positions excluded in every row: data.drop_first (and a row-start token)
        drop_first = int((~downstream.positions).all(dim=0).int().cumprod(0).sum())
        sets = [_builtin_set(downstream, n_tokens)] if builtin else []
        sets += [load_task(spec, downstream.lm.tokenizer, downstream.tokens.shape[1], drop_first, n_tokens)
                 for spec in tasks]
        cache[n_tokens, tasks, builtin] = [s for s in sets if s.labels]
    return cache[n_tokens, tasks, builtin]


def _pool(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Each row's maximum [n_rows, k] of values [n, k], whose positions lie in `rows`."""
    out = torch.full((n_rows, values.shape[1]), -math.inf)
    return out.scatter_reduce_(0, rows[:, None].expand_as(values), values, "amax")


def _features(sae, downstream, layer: int, probe_set: ProbeSet, with_inputs: bool):
    """The SAE's latents (and, with_inputs, its normalised input) on the CPU, [n, k] at the probed positions in
    row-major order, or for a sequence task [rows, k], each row's maximum over its positions. A batch of rows at
    a time: a sequence task's site vectors and per-token latents are never held whole."""
    extract = ActivationExtractor(downstream.lm.model, downstream.site, [layer])
    device = sae.net.W_dec.device
    fns = [sae.encode] + ([lambda x: sae.normalize(x)[0]] if with_inputs else [])
    parts = [[] for _ in fns]
    for lo in range(0, len(probe_set.tokens), downstream.batch_rows):
        rows = slice(lo, lo + downstream.batch_rows)
        keep = probe_set.keep[rows]
        if not bool(keep.any()):  # only token rows can be wholly excluded (sequence rows are checked non-empty)
            continue
        mask = None if probe_set.attention is None else probe_set.attention[rows].to(downstream.device)
        acts = extract(probe_set.tokens[rows].to(downstream.device), mask)[0][keep.to(downstream.device)].float()
        for fn, out in zip(fns, parts):
            values = torch.cat([fn(acts[i:i + 1024].to(device)).float().cpu() for i in range(0, len(acts), 1024)])
            out.append(values if probe_set.level == "token" else _pool(values, keep.nonzero()[:, 0], len(keep)))
    latents, *inputs = [torch.cat(p) for p in parts]
    return latents, inputs[0] if inputs else None


@torch.no_grad()
def evaluate_probes(sae, downstream, layer: int, n_tokens: int = 4096, tasks: Sequence[ProbeTaskSpec] = (),
                    builtin: bool = True) -> tuple[dict, list[dict]]:
    """The probe columns (means over every usable task: the built-in token tasks of
    sae_core.evaluation.probe_tasks on the first `n_tokens` held-out positions of `downstream` (a
    DownstreamEval), unless `builtin` is off, and the user's `tasks`, sae_core.evaluation.probe_datasets) and
    the per-task table, at `layer`. The baseline probes each coordinate of the SAE's normalised input (pooled
    like the latents): it depends only on the task, the layer and the normalisation, so it is fitted once per
    evaluator and reused by every run."""
    cache = downstream.__dict__.setdefault("_probe_baselines", {})
    rows = []
    for probe_set in _probe_sets(downstream, n_tokens, tuple(tasks), builtin):
        key = (layer, sae.cfg.normalization, n_tokens, probe_set.key)
        latents, inputs = _features(sae, downstream, layer, probe_set, key not in cache)
        if key not in cache:
            cache[key] = {name: fit_probes(inputs, y) for name, y in probe_set.labels.items()}
        for name, y in probe_set.labels.items():
            fit, base = fit_probes(latents, y), cache[key][name]
            rows.append({"task": name, "level": probe_set.level, "source": probe_set.source,
                         "base_rate": float(y.mean()), "loss": fit.loss, "baseline": base.loss,
                         "best_latent": fit.best})
    if not rows:
        return dict.fromkeys(PROBE_COLUMNS), []
    metrics = {"probe_loss": math.fsum(r["loss"] for r in rows) / len(rows),
               "probe_loss_baseline": math.fsum(r["baseline"] for r in rows) / len(rows)}
    return metrics, rows
