"""Successive halving over one axis of the grid (normally lr), per cell: the runs that differ only in that axis
(Jamieson & Talwalkar 2016; the rungs and promotion of Ray Tune's ASHA, Li et al. 2020, run synchronously per
cell so that every decision is the same however the runs were scheduled, and a re-run repeats it).

Every candidate of a cell trains to the first rung (a fraction of the token budget); they are ranked by their
held-out nmse there; the best continue, from their checkpoints, to the next rung; and so on until `keep` of
them train to the full budget. A run is an exact prefix of its full run (the lr schedule is set by the
budget), so a winner costs what it would in the full grid and the others stop early.

The honest-ranking guard (the defaults): early in training the largest learning rates lead, and the smaller
ones overtake them later, sometimes only in the last third of the budget (bench/search.py: at 1/3 of the
budget the lr twice the best still led by 2%). So the rungs keep half their candidates (eta 2) while the
tokens triple (growth 3), at least `min_keep` (2) runs continue past every rung but the last, and the auto
rungs end with a late one at 1 - 1/growth (2/3) of the budget where the last two are decided; and a run is
ranked not by its nmse at the rung but by that nmse carried to the next rung (or the budget) along its own
curve's recent slope in log-log (`rank: extrapolated`), fitted to its curve points in the last half decade of
tokens before the rung: a run still falling fast is credited for it. Textbook successive halving is
`eta: 3, min_keep: 1, rank: current`.

Each run that reaches a rung appends {rung, tokens, nmse} to its `rungs` table (and its row, status `stopped`,
its curve and checkpoint stay), so the search's state is on disk: `plan_round` reads it back and decides the
same next round after a crash.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

SLOPE_WINDOW = math.sqrt(10)  # the curve points in the last half decade of tokens before a rung give its slope


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    axis: str = "lr"  # the searched grid axis; the runs of a cell differ only in it
    eta: float = Field(2.0, gt=1)  # each rung keeps the best 1/eta of its candidates (rounded up)
    growth: float = Field(3.0, gt=1)  # auto rungs: the tokens grow by this factor from one rung to the next
    # fractions of the token budget at which the candidates are ranked, increasing, each in (0, 1); auto: one
    # rung per halving, ceil(log_eta(candidates / keep)) of them, at growth^-s, ..., growth^-1 of the budget
    # (successive halving); with the guard (min_keep > keep) the last halving is a late rung at 1 - 1/growth
    rungs: list[float] | Literal["auto"] = "auto"
    keep: int = Field(1, ge=1)  # runs per cell trained to the full budget
    min_keep: int = Field(2, ge=1)  # guard: at least this many continue past every rung but the last
    # extrapolated: rank by the nmse carried to the next rung along the run's recent slope (the guard against
    # early rankings favouring large lrs); current: by the nmse at the rung
    rank: Literal["extrapolated", "current"] = "extrapolated"

    @field_validator("rungs")
    @classmethod
    def _increasing_fractions(cls, rungs):
        if rungs != "auto" and (not rungs or any(not 0 < f < 1 for f in rungs) or list(rungs) != sorted(set(rungs))):
            raise ValueError(f"{rungs}: allowed: auto, or increasing fractions of the budget, each in (0, 1)")
        return rungs

    def fractions(self, candidates: int) -> list[float]:
        if self.rungs != "auto":
            return list(self.rungs)
        if candidates <= self.keep:
            return []
        halvings = math.ceil(math.log(candidates / self.keep) / math.log(self.eta) - 1e-9)
        guard = self.min_keep > self.keep and candidates > self.keep + 1
        s = halvings - 1 if guard else halvings
        late = [1 - 1 / self.growth] if guard else []
        return sorted({self.growth ** -(s - i) for i in range(s)} | set(late))

    def survivors(self, candidates: int, n_rungs: int) -> list[int]:
        """How many continue past each rung: ceil(1/eta) of those ranked, at least min_keep (keep after the
        last rung), never more than were ranked."""
        out, alive = [], candidates
        for i in range(n_rungs):
            floor = self.keep if i == n_rungs - 1 else max(self.keep, self.min_keep)
            alive = min(alive, max(math.ceil(alive / self.eta), floor))
            out.append(alive)
        return out


@dataclass(frozen=True)
class Candidate:
    run_id: str
    budget: int  # the run's full token budget
    batch_size: int
    flops_per_token: float


def rung_tokens(fraction: float, budget: int, batch_size: int) -> int:
    """A rung's token count: the fraction of the budget, rounded up to whole steps (at least one)."""
    steps = max(1, math.ceil(fraction * budget / batch_size - 1e-9))
    return min(budget, steps * batch_size)


def cell_key(axes: Mapping, layer, model, axis: str) -> str:
    """The runs that differ only in the searched axis share a key."""
    return json.dumps({"axes": {k: v for k, v in axes.items() if k != axis}, "layer": layer, "model": model},
                      sort_keys=True, default=str)


def slope(curve: list[dict], tokens: int) -> float:
    """d log nmse / d log tokens over the curve points in (tokens / SLOPE_WINDOW, tokens]; 0 when fewer than two
    points or when rising (a run getting worse is not credited with improving)."""
    pts = [(c["tokens"], c["nmse"]) for c in curve
           if tokens / SLOPE_WINDOW < c["tokens"] <= tokens and c.get("nmse") and c["nmse"] > 0]
    if len({t for t, _ in pts}) < 2:
        return 0.0
    x, y = np.log([t for t, _ in pts]), np.log([v for _, v in pts])
    return min(0.0, float(np.polyfit(x, y, 1)[0]))


def score(nmse: float, tokens: int, next_tokens: int, curve: list[dict], rank: str) -> float:
    if rank == "current" or not math.isfinite(nmse):
        return nmse if math.isfinite(nmse) else math.inf
    return nmse * (next_tokens / tokens) ** slope(curve, tokens)


@dataclass
class Round:
    """What to train next: run_id -> (rung index, tokens to stop at); rung index == len(rungs) is the budget."""
    targets: dict[str, tuple[int, int]]
    winners: dict[str, list[str]]  # cell -> runs that reached the full budget (or will)
    stopped: dict[str, int]  # run_id -> the rung it was stopped at


def schedule(cfg: SearchConfig, cands: list[Candidate], earlier: list[int] = ()) -> tuple[list[float], list[int]]:
    """A cell's rungs, as fractions of its first budget, and how many continue past each. earlier: the budgets
    the cell had before (ascending), when its budget was raised after its search had finished: the search
    ran on the first of them, and each is one more rung past which `keep` continue (its winners go on)."""
    first = earlier[0] if earlier else cands[0].budget
    fractions = cfg.fractions(len(cands))
    survivors = cfg.survivors(len(cands), len(fractions))
    return fractions + [b / first for b in earlier], survivors + [cfg.keep] * len(earlier)


def _tokens(c: Candidate, fractions: list[float], first: int) -> list[int]:
    return [rung_tokens(f, first, c.batch_size) for f in fractions]


def _rank(c: Candidate, i: int, tokens: list[int], records: Mapping[str, Mapping[int, dict]],
          curves: Mapping[str, list[dict]], rank: str) -> tuple[float, str]:
    """A candidate's sort key at rung i of its rung tokens (ties by run_id, so every re-run ranks alike)."""
    mine = records.get(c.run_id, {})
    rec = mine.get(i)
    if rec is None:  # trained to the budget before the search (a grid run): its final nmse
        final = mine.get(len(tokens), {}).get("nmse")
        return (final if final is not None else math.inf, c.run_id)
    nxt = tokens[i + 1] if i + 1 < len(tokens) else c.budget
    curve = [p for p in curves.get(c.run_id, []) if p.get("tokens", 0) <= rec["tokens"]]
    return (score(rec["nmse"], rec["tokens"], nxt, curve, rank), c.run_id)


def plan_round(cells: Mapping[str, list[Candidate]], records: Mapping[str, Mapping[int, dict]],
               curves: Mapping[str, list[dict]], cfg: SearchConfig, done: set[str],
               history: Mapping[str, list[int]] | None = None) -> Round:
    """The next round of the search from what is on disk. records: run_id -> rung -> {tokens, nmse} (rung
    len(rungs): the full budget; a run finished before the search has only that one); curves: run_id -> its
    curve rows; done: the runs that finished their full budget; history: cell -> its earlier budgets
    (`schedule`)."""
    targets: dict[str, tuple[int, int]] = {}
    winners: dict[str, list[str]] = {}
    stopped: dict[str, int] = {}
    for key, cands in cells.items():
        earlier = list((history or {}).get(key, []))
        fractions, survivors = schedule(cfg, cands, earlier)
        first = earlier[0] if earlier else cands[0].budget
        tokens = {c.run_id: _tokens(c, fractions, first) for c in cands}
        alive = sorted(cands, key=lambda c: c.run_id)
        for i in range(len(fractions)):
            missing = [c for c in alive if i not in records.get(c.run_id, {}) and c.run_id not in done]
            if missing:
                targets.update({c.run_id: (i, tokens[c.run_id][i]) for c in missing})
                break
            ranked = sorted(alive, key=lambda c, i=i: _rank(c, i, tokens[c.run_id], records, curves, cfg.rank))
            for c in ranked[survivors[i]:]:
                stopped[c.run_id] = i
            alive = ranked[:survivors[i]]
        else:
            winners[key] = [c.run_id for c in alive]
            targets.update({c.run_id: (len(fractions), c.budget) for c in alive if c.run_id not in done})
    return Round(targets, winners, stopped)


def expected_flops(cells: Mapping[str, list[Candidate]], cfg: SearchConfig) -> float:
    """The search's training FLOPs if it runs to the end (each rung's survivors continue from the last rung)."""
    total = 0.0
    for cands in cells.values():
        fractions, survivors = schedule(cfg, cands)
        counts = [len(cands), *survivors]
        c = cands[0]
        edges = [0, *(rung_tokens(f, c.budget, c.batch_size) for f in fractions), c.budget]
        per_token = sum(x.flops_per_token for x in cands) / len(cands)
        total += sum(n * (hi - lo) for n, lo, hi in zip(counts, edges, edges[1:])) * per_token
    return total
