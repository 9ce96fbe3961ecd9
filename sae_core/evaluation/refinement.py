"""Activation refinement: how much better the SAE's frozen latents reconstruct when their values are re-fitted
(Gao et al. 2024, §5.1, Fig. 9). An L1 penalty shrinks activations toward 0; re-optimising the values of the
active latents with the decoder frozen measures that shrinkage, and how much of the gap to TopK it closes.

For each held-out vector x, normalised as the SAE normalises it (x_n, `sae.encode_code`), with code z:
  S = the latents nonzero in z (at most `max_active` of them, the largest: an L1 family's active set can be
      large, and the cost grows as |S|^2; the latents past the cap keep their values and are part of the
      fixed target, so refinement still never raises the error; `capped_frac` says how many vectors hit it),
  z*_S = argmin_{z_S >= 0} ||x_n - (W_dec[S]^T z_S + W_dec[S']^T z_S' + b_pre)||^2   (S' = the capped latents),
solved per vector (batched) as a nonnegative least-squares problem in float64 by Lawson and Hanson's active-set
method started from the original values (`nnls`): exact, and every step lowers the error, so no vector's error
rises.

Reported (over the vectors given; a multi-layer SAE's vectors are pooled, all layers together):
  refined_nmse    = sum ||x - x_hat*||^2 / sum ||x - mean(x)||^2 in the original activation space, x_hat* the
                    refined reconstruction mapped back with each vector's stats: the runs' nmse definition
                    (sae_core.evaluation.reconstruction) on the same vectors; `nmse` is the unrefined one there.
  shrinkage       = sum z_S z*_S / sum (z*_S)^2 over the active (vector, latent) pairs: the least-squares slope
                    (through 0) of the original values on the refined ones. 1: no shrinkage; < 1: the original
                    activations are shrunk (0.5: half their refined size). nan when no latent is active.
  refinement_mean = mean (z*_S - z_S) over the active pairs, in the units of the code (normalised input space):
                    positive for ReLU SAEs, near 0 for TopK (Gao et al. 2024, §5.1, Fig. 9).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_core.architectures import SparseCode
from sae_core.sae import SAE

MAX_ACTIVE = 128  # default cap on the latents refined per vector (module docstring)
_CHUNK_ELEMENTS = 1 << 23  # float64 elements of the gathered decoder rows [rows, |S|, d_in] per chunk


@dataclass
class Refinement:
    metrics: dict[str, float]  # refined_nmse, shrinkage, refinement_mean, nmse (unrefined), capped_frac
    latents: torch.Tensor  # [N, m]: the refined latents of each vector (padding where `active` is False)
    original: torch.Tensor  # [N, m]: their original values (float64)
    refined: torch.Tensor  # [N, m]: their refined values (float64; 0 where inactive)
    active: torch.Tensor  # [N, m] bool


def _objective(G: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """0.5 z^T G z - c^T z per row: ||t - D^T z||^2 / 2 up to the constant ||t||^2 / 2."""
    return 0.5 * (z * (G @ z.unsqueeze(-1)).squeeze(-1)).sum(-1) - (c * z).sum(-1)


def _solve_on(G: torch.Tensor, c: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The unconstrained minimiser on the coordinates P of each row (0 off P), by Cholesky with a ridge of 1e-12
    of the mean diagonal (decoder rows that are linearly dependent would make G_PP singular)."""
    ridge = 1e-12 * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    Gp = torch.where(P.unsqueeze(-1) & P.unsqueeze(-2), G, 0.0)
    Gp.diagonal(dim1=-2, dim2=-1).add_((~P).to(G.dtype) + ridge[:, None])  # identity off P
    L, _ = torch.linalg.cholesky_ex(Gp)
    return torch.cholesky_solve(torch.where(P, c, 0.0).unsqueeze(-1), L).squeeze(-1) * P


def nnls(G: torch.Tensor, c: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor,
         max_iter: int | None = None) -> torch.Tensor:
    """Batched min_{z >= 0, z = 0 off mask} 0.5 z^T G z - c^T z: G [B, m, m] (D D^T), c [B, m] (D t), z0 [B, m]
    the feasible start (the original activations), mask [B, m] the active latents.

    Lawson and Hanson's active-set method, started from z0 with its positive coordinates free (a TopK code's
    refinement is usually one solve): solve on the free set; if that leaves the feasible set, step to its
    boundary and fix the coordinates that reach 0; once feasible, free the fixed coordinate of most negative
    gradient, until none has one (the KKT conditions: the exact NNLS solution). An L1 code's first solve puts
    dozens of coordinates below 0, which that boundary step fixes one at a time; so a row also tries the
    solve clipped at 0 (all of them fixed at once) and takes it where its objective is lower. Both steps only
    shrink the free set and lower the objective, so the method still ends, at the same solution, in far fewer
    solves. Every step lowers the objective, so a row stopped by max_iter (default 3m + 10) is still no worse
    than z0; each row keeps the better of z0 and its result, against rounding."""
    B, m = c.shape
    mask = mask.bool()
    start = z0.clamp_min(0) * mask
    z, P = start.clone(), mask & (start > 0)
    tol = 1e-11 * (c.abs().amax(-1) + G.diagonal(dim1=-2, dim2=-1).amax(-1) * z.amax(-1) + 1e-300)
    todo = torch.arange(B, device=c.device)
    Gt, ct, mt, tt = G, c, mask, tol  # the rows still iterating, compacted as rows finish
    for _ in range(max_iter or 3 * m + 10):
        if len(todo) == 0:
            break
        zt, Pt = z[todo], P[todo]
        s = _solve_on(Gt, ct, Pt)
        bad = Pt & (s <= 0)
        infeasible = bad.any(-1)
        # infeasible rows: step from z toward s until the first free coordinate reaches 0, and fix it ...
        ratio = torch.where(bad, zt / (zt - s).clamp_min(1e-300), torch.full_like(s, float("inf")))
        alpha = ratio.amin(-1).clamp(0, 1).unsqueeze(-1)
        stepped = (zt + alpha * (s - zt)).clamp_min(0) * Pt
        # ... or fix every coordinate s puts at or below 0, where that ends lower
        clipped = s.clamp_min(0)
        jump = (infeasible & (_objective(Gt, ct, clipped) < _objective(Gt, ct, stepped))).unsqueeze(-1)
        z_new = torch.where(infeasible.unsqueeze(-1), torch.where(jump, clipped, stepped), s)
        P_new = torch.where(infeasible.unsqueeze(-1), torch.where(jump, Pt & (s > 0), Pt & (stepped > tt[:, None])),
                            Pt)
        # feasible rows: free the fixed active coordinate with the most negative gradient, or stop
        w = ct - (Gt @ z_new.unsqueeze(-1)).squeeze(-1)
        w = torch.where(mt & ~Pt, w, torch.full_like(w, -float("inf")))
        best_w, j = w.max(-1)
        grow = ~infeasible & (best_w > tt)
        P_new[grow.nonzero().squeeze(1), j[grow]] = True
        z[todo], P[todo] = z_new, P_new
        keep = infeasible | grow
        if not bool(keep.all()):
            todo, Gt, ct, mt, tt = todo[keep], Gt[keep], ct[keep], mt[keep], tt[keep]
    better = _objective(G, c, z) < _objective(G, c, start)
    return torch.where(better.unsqueeze(-1), z, start)


@torch.no_grad()
def refine(sae: SAE, x: torch.Tensor, max_active: int = MAX_ACTIVE, batch_size: int = 4096) -> Refinement:
    """Refine the activations of the SAE's code of each row of x (module docstring). A sharded SAE's decoder
    is split over processes: not supported here (evaluate_run leaves its columns null)."""
    if sae.net.mesh.shards > 1:
        raise ValueError("activation refinement needs the whole decoder (a sharded SAE holds a shard of it)")
    W = sae.net.W_dec.detach().to(torch.float64)
    device = W.device
    mean = x.to(torch.float64).mean(dim=0).to(device)
    sq_err = sq_err_ref = total_var = 0.0
    capped = 0
    out: dict[str, list[torch.Tensor]] = {"latents": [], "original": [], "refined": [], "active": []}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        code, stats = sae.encode_code(xb)
        xn, _ = sae.normalize(xb.to(sae.net.W_dec.dtype))
        if isinstance(code, SparseCode):
            idx, vals = code.idx, code.vals
        else:  # dense families: a latent's position is its index
            vals = code
            idx = torch.arange(code.shape[1], device=device).expand_as(code)
        nonzero = (vals != 0).sum(dim=1)
        m = max(1, min(max_active, int(nonzero.max()) if len(nonzero) else 1))  # no wider than the batch needs
        capped += int((nonzero > m).sum())
        pos = vals.abs().topk(m, dim=1).indices  # the largest |S| <= max_active active positions
        lat, z0 = idx.gather(1, pos), vals.gather(1, pos).to(torch.float64)
        active = z0 != 0
        x_hat_n = sae.net.decode(code).to(torch.float64)
        refined = torch.zeros_like(z0)
        x_ref_n = x_hat_n.clone()
        rows = max(1, _CHUNK_ELEMENTS // (m * W.shape[1]))
        for c0 in range(0, xb.shape[0], rows):
            sl = slice(c0, c0 + rows)
            # [r, m, d]: the decoder rows of the refined latents (padding positions have z0 = 0 and are kept at 0
            # by nnls's mask, so their rows are never used)
            D = W[lat[sl]]
            # the target the refined latents fit: x_n minus everything else of the reconstruction (b_pre and
            # the latents past the cap), i.e. x_n - x_hat_n + D^T z0
            target = xn[sl].to(torch.float64) - x_hat_n[sl] + (z0[sl].unsqueeze(1) @ D).squeeze(1)
            G = D @ D.transpose(1, 2)
            c = (D @ target.unsqueeze(-1)).squeeze(-1)
            refined[sl] = nnls(G, c, z0[sl], active[sl])
            # the refined reconstruction in float64 from the same decode, so a vector whose values do not move
            # keeps exactly its error
            x_ref_n[sl] += ((refined[sl] - z0[sl]).unsqueeze(1) @ D).squeeze(1)
        # back to the original space with each vector's stats, as the runs' nmse
        x_orig, x_ref = (v if stats is None else v * stats.scale.double() + stats.shift.double()
                         for v in (x_hat_n, x_ref_n))
        xd = xb.double()
        sq_err += float((xd - x_orig).pow(2).sum())
        sq_err_ref += float((xd - x_ref).pow(2).sum())
        total_var += float((xd - mean).pow(2).sum())
        for key, val in (("latents", lat), ("original", z0), ("refined", refined), ("active", active)):
            out[key].append(val.cpu())
    # a batch's width is its code's (BatchTopK's varies by batch): pad to the widest, padding inactive
    width = max((t.shape[1] for t in out["active"]), default=1)
    res = {k: torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in v]) if v else
           torch.zeros(0, width) for k, v in out.items()}
    a = res["active"]
    zo, zr = res["original"][a], res["refined"][a]
    denom = float(zr.pow(2).sum())
    nan = float("nan")
    metrics = {
        "refined_nmse": sq_err_ref / total_var if total_var > 0 else nan,
        "nmse": sq_err / total_var if total_var > 0 else nan,
        "shrinkage": float((zo * zr).sum()) / denom if denom > 0 else nan,
        "refinement_mean": float((zr - zo).mean()) if zo.numel() else nan,
        "capped_frac": capped / x.shape[0] if x.shape[0] else nan,
    }
    return Refinement(metrics, res["latents"], res["original"], res["refined"], a)
