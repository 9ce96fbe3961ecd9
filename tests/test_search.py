"""Successive halving over lr per cell (orchestrator/search.py): the rungs and promotions against hand-worked
cases, the guard's extrapolation, and a real search on Ray that stops, resumes after its driver is killed, and
finishes with the same winners as an uninterrupted one."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator.search import Candidate, SearchConfig, expected_flops, plan_round, rung_tokens, score, slope

BUDGET, BATCH = 9000, 100


def cell(n=5):
    return {"c": [Candidate(f"r{i}", BUDGET, BATCH, 10.0) for i in range(n)]}


def test_auto_rungs_and_survivors_follow_successive_halving_with_a_late_rung():
    cfg = SearchConfig()
    # 5 -> 3 -> 2 -> 1 takes ceil(log2 5) = 3 halvings: rungs at 1/9 and 1/3 (tokens x3 each), and the
    # guard's late rung at 1 - 1/3 deciding the last two
    assert cfg.fractions(5) == pytest.approx([1 / 9, 1 / 3, 2 / 3])
    assert cfg.survivors(5, 3) == [3, 2, 1]
    assert cfg.fractions(9) == pytest.approx([1 / 27, 1 / 9, 1 / 3, 2 / 3]) and cfg.survivors(9, 4) == [5, 3, 2, 1]
    assert cfg.fractions(3) == pytest.approx([1 / 3, 2 / 3]) and cfg.survivors(3, 2) == [2, 1]
    assert cfg.fractions(2) == pytest.approx([1 / 3]) and cfg.fractions(1) == []  # 2: one halving, no late rung
    # textbook successive halving: eta 3 for both the survivors and the rungs, no guard
    plain = SearchConfig(eta=3, min_keep=1, rank="current")
    assert plain.fractions(5) == pytest.approx([1 / 9, 1 / 3]) and plain.survivors(5, 2) == [2, 1]
    assert SearchConfig(eta=2, growth=2, min_keep=1).fractions(5) == pytest.approx([1 / 8, 1 / 4, 1 / 2])
    assert SearchConfig(eta=2, min_keep=1).survivors(5, 3) == [3, 2, 1]
    assert SearchConfig(eta=10, min_keep=2).survivors(9, 2) == [2, 1]
    assert SearchConfig(eta=3, keep=2, rungs=[0.25]).survivors(6, 1) == [2]
    assert rung_tokens(1 / 9, BUDGET, BATCH) == 1000 and rung_tokens(1 / 3, 1000, 64) == 384  # whole steps
    # 5 runs to 1000 tokens, 3 on to 3000, 2 on to 6000, 1 on to 9000: (5000 + 6000 + 6000 + 3000) x 10 FLOPs
    assert expected_flops(cell(), cfg) == pytest.approx(200_000.0)
    assert expected_flops(cell(), plain) == pytest.approx(150_000.0)  # 5000 + 4000 + 6000
    with pytest.raises(ValueError, match="increasing fractions"):
        SearchConfig(rungs=[0.5, 0.2])


def _records(nmse: dict[str, float], rung: int, tokens: int, base: dict | None = None) -> dict:
    out = {k: dict(v) for k, v in (base or {}).items()}
    for rid, v in nmse.items():
        out.setdefault(rid, {})[rung] = {"tokens": tokens, "nmse": v}
    return out


def test_promotion_round_by_round_to_one_winner():
    cfg = SearchConfig(eta=3, rank="current", min_keep=1)
    first = plan_round(cell(), {}, {}, cfg, set())
    assert first.targets == {f"r{i}": (0, 1000) for i in range(5)} and not first.winners
    rec = _records({"r0": 0.5, "r1": 0.3, "r2": 0.2, "r3": 0.4, "r4": 0.6}, 0, 1000)
    second = plan_round(cell(), rec, {}, cfg, set())
    assert second.targets == {"r2": (1, 3000), "r1": (1, 3000)}
    assert second.stopped == {"r0": 0, "r3": 0, "r4": 0}
    rec = _records({"r1": 0.15, "r2": 0.18}, 1, 3000, rec)
    third = plan_round(cell(), rec, {}, cfg, set())
    assert third.targets == {"r1": (2, BUDGET)} and third.winners == {"c": ["r1"]}
    rec = _records({"r1": 0.1}, 2, BUDGET, rec)
    last = plan_round(cell(), rec, {}, cfg, {"r1"})
    assert last.targets == {} and last.winners == {"c": ["r1"]} and last.stopped == {**second.stopped, "r2": 1}
    # a partial round (a run killed before its rung) trains only what is missing
    partial = _records({"r0": 0.5, "r1": 0.3}, 0, 1000)
    assert plan_round(cell(), partial, {}, cfg, set()).targets == {f"r{i}": (0, 1000) for i in (2, 3, 4)}


def _curve(tokens, a, b):
    return [{"tokens": t, "nmse": a * t ** b} for t in tokens]


def test_the_guard_credits_a_run_still_falling():
    ts = [300, 500, 700, 1000]
    fast_start = _curve(ts, 0.2 * 1000 ** 0.02, -0.02)  # 0.2 at the rung, nearly flat: a too-large lr
    still_falling = _curve(ts, 0.22 * 1000 ** 0.5, -0.5)  # 0.22 at the rung, falling as t^-1/2
    assert slope(fast_start, 1000) == pytest.approx(-0.02) and slope(still_falling, 1000) == pytest.approx(-0.5)
    assert score(0.22, 1000, 3000, still_falling, "extrapolated") == pytest.approx(0.22 * 3 ** -0.5)
    assert slope(_curve(ts, 0.1, 0.3), 1000) == 0.0  # rising: no credit
    assert slope(ts and [{"tokens": 1000, "nmse": 0.2}], 1000) == 0.0  # one point: no slope
    rec = _records({"r0": 0.2, "r1": 0.22}, 0, 1000)
    curves = {"r0": fast_start, "r1": still_falling}
    two = {"c": cell(2)["c"]}
    cfg = SearchConfig(rungs=[1 / 9])
    assert plan_round(two, rec, curves, cfg, set()).targets == {"r1": (1, BUDGET)}
    assert plan_round(two, rec, curves, SearchConfig(rungs=[1 / 9], rank="current"), set()).targets == \
        {"r0": (1, BUDGET)}
    # only the curve up to the rung counts: points recorded later (the run went on) do not change the ranking
    later = {k: v + _curve([5000, 9000], 1e-6, 0) for k, v in curves.items()}
    assert plan_round(two, rec, later, cfg, set()).targets == {"r1": (1, BUDGET)}


def test_a_run_finished_before_the_search_ranks_by_its_final_nmse():
    rec = _records({"r0": 0.3, "r1": 0.2}, 0, 1000)
    rec["r2"] = {1: {"tokens": BUDGET, "nmse": 0.05}}
    three = {"c": cell(3)["c"]}
    out = plan_round(three, rec, {}, SearchConfig(eta=3, rungs=[1 / 9], rank="current"), {"r2"})
    assert out.targets == {} and out.winners == {"c": ["r2"]}


def test_search_config_is_checked_against_the_grid():
    from orchestrator.spec import parse_spec
    from sae_core.errors import ConfigError

    base = {"name": "s", "data": {"synthetic": {"d_in": 8}, "train_tokens": 100},
            "grid": {"arch": ["topk"], "n_latents": [16], "k": [2], "lr": [1e-3]}}
    with pytest.raises(ConfigError, match="search.axis: 'lr' needs at least 2 values"):
        parse_spec({**base, "search": {}}, "s.yaml")
    zipped = {**base, "grid": {**base["grid"], "n_latents": [16, 32], "lr": [1e-3, 2e-3]},
              "zip": [["n_latents", "lr"]], "search": {}}
    with pytest.raises(ConfigError, match="zipped"):
        parse_spec(zipped, "s.yaml")
    with pytest.raises(ConfigError, match="search.eta"):
        parse_spec({**base, "grid": {**base["grid"], "lr": [1e-3, 2e-3]}, "search": {"eta": 1}}, "s.yaml")
    assert parse_spec({**base, "grid": {**base["grid"], "lr": [1e-3, 2e-3]}, "search": {"eta": 2}}).search.eta == 2


# ---------------------------------------------------------------- a real search on Ray

def _sweep(tmp_path, name="srch"):
    spec = {"name": name, "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                                   "train_tokens": 27_000, "eval_tokens": 1024},
            "grid": {"arch": ["topk"], "n_latents": [64, 128], "k": [4], "lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
            "train": {"batch_size": 200, "init_samples": 512, "curve_points_per_decade": 8},
            "eval": {"recovery": False, "refinement": False}, "search": {}, "pack_size": 5}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _outcome(results):
    from analysis.results import load_runs

    runs = load_runs(results)
    ok = runs[runs["status"] == "ok"].sort_values("n_latents")
    return runs, [(int(r.n_latents), float(r.lr), float(r.nmse)) for r in ok.itertuples()]


def test_a_search_trains_winners_to_the_end_and_stops_the_rest(tmp_path, ray_local, capsys):
    from orchestrator.cli import main
    from orchestrator.store import ResultsStore
    from sae_core.checkpoint import has_checkpoint

    path = _sweep(tmp_path)
    assert main(["run", str(path), "--results", str(tmp_path / "results"), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "search over lr in 2 cells of 5 candidates" in dry and "44% of the full grid's" in dry
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "search winner" in out and "runs stopped early" in out
    runs, winners = _outcome(tmp_path / "results" / "srch")
    assert len(runs) == 10 and sorted(runs["status"].value_counts().items()) == [("ok", 2), ("stopped", 8)]
    store = ResultsStore.at(tmp_path / "results" / "srch")
    rungs = store.rungs(runs["run_id"])
    stopped = runs[runs["status"] == "stopped"]
    # of each cell 2 stopped at the first rung (1/9 of the budget), 1 at the second (1/3), 1 at the late (2/3)
    assert sorted(stopped["tokens"].tolist()) == [3000] * 4 + [9000] * 2 + [18000] * 2
    for rid in stopped["run_id"]:  # each keeps its curve and the checkpoint a raised budget would continue from
        assert store.curve(rid) and has_checkpoint(store.sae_dir(rid))
    for rid in runs[runs["status"] == "ok"]["run_id"]:
        assert sorted(rungs[rid]) == [0, 1, 2, 3] and rungs[rid][3]["tokens"] == 27_000
    spent = runs["flops"].sum()
    full = 5 * runs[runs["status"] == "ok"]["flops"].sum()
    assert spent / full == pytest.approx(4 / 9, abs=0.02)
    # running it again: nothing left to do
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0
    assert "runs, 2 already done" in capsys.readouterr().out
    assert _outcome(tmp_path / "results" / "srch")[1] == winners


@pytest.mark.skipif(sys.platform != "linux", reason="kills a process group")
def test_killing_the_driver_mid_search_and_rerunning_gives_the_same_winners(tmp_path, ray_local):
    from orchestrator.cli import main

    path = _sweep(tmp_path)
    assert main(["run", str(path), "--results", str(tmp_path / "clean")]) == 0
    _, clean = _outcome(tmp_path / "clean" / "srch")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--results",
                             str(tmp_path / "killed")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rungs = tmp_path / "killed" / "srch" / "rungs"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(rungs.glob("*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(["run", str(path), "--results", str(tmp_path / "killed")]) == 0
    _, resumed = _outcome(tmp_path / "killed" / "srch")
    assert [(n, lr) for n, lr, _ in resumed] == [(n, lr) for n, lr, _ in clean]
    for (_, _, a), (_, _, b) in zip(resumed, clean):
        assert math.isclose(a, b, rel_tol=1e-5)


# ---------------------------------------------------------------- what the fits take from a search

def _searched_store(tmp_path):
    """3 widths x 3 lrs: the middle lr wins each cell; the others stopped at rung 0 (1/9 of the budget). Each
    run's nmse falls as tokens^-0.1 from its rung-0 value, the middle lr's the lowest."""
    import json

    import numpy as np

    from orchestrator.store import RUN_SCHEMA, ResultsStore

    store = ResultsStore(tmp_path, "s")
    store.save_spec("name: s\n")
    budget = 9000
    for n in (64, 128, 256):
        for j, lr in enumerate((1e-3, 2e-3, 4e-3)):
            rid = f"n{n}_lr{lr:g}"
            start = (0.5 + 0.1 * (j - 1) ** 2) * (n / 64) ** -0.3  # at 1000 tokens; lr 2e-3 the best
            won = j == 1
            tokens = budget if won else 1000
            ts = [t for t in np.geomspace(100, budget, 12) if t <= tokens]
            curve = [{"step": i, "tokens": int(t), "flops": float(t * 10 * n), "nmse": start * (t / 1000) ** -0.1}
                     for i, t in enumerate(ts)]
            nmse = start * (tokens / 1000) ** -0.1
            row = {"run_id": rid, "sweep": "s", "status": "ok" if won else "stopped", "arch": "topk", "n_latents": n,
                   "k": 4, "lr": lr, "seed": 0, "tokens": tokens, "flops": float(tokens * 10 * n), "nmse": nmse,
                   "l0": 4.0, "config_json": json.dumps({"axes": {"n_latents": n, "lr": lr}})}
            store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row, curve=curve)
            store.add_rung(rid, {"rung": 0, "tokens": 1000, "nmse": start})
            if won:
                store.add_rung(rid, {"rung": 1, "tokens": budget, "nmse": nmse})
    return store


def test_fits_take_a_searchs_stopped_runs_into_lc_and_the_lr_law(tmp_path):
    from analysis.results import load_runs, load_table
    from analysis.sweep_fits import fit_sweep, search_estimates

    store = _searched_store(tmp_path)
    runs = load_runs(store.dir)
    est = search_estimates(runs, load_table(store.dir, "rungs"))
    gain = 9 ** -0.1  # what each winner gained from rung 0 to the budget
    for rid, nmse0 in ((r, store.rungs([r])[r][0]["nmse"]) for r in runs["run_id"]):
        assert est[rid] == pytest.approx(nmse0 * gain)  # every run gains what its cell's winner gained
    fits, _ = fit_sweep(store.dir)
    (lr,) = [f for f in fits.values() if f.law == "lr"]
    # the estimates are a parabola in log lr with its vertex at 2e-3 at every width: a flat law through 2e-3
    assert list(lr.extra["best"]["n_lrs"]) == [3, 3, 3]
    assert lr.predict(n_latents=128) == pytest.approx(2e-3, rel=1e-6) and lr.params["b"] == pytest.approx(0, abs=1e-6)
    (loc,) = [f for f in fits.values() if f.law == "loc"]
    assert set(loc.runs) & set(runs.loc[runs.status == "stopped", "run_id"])  # stopped curves on the frontier
    (lofn,) = [f for f in fits.values() if f.law == "lofn"]
    assert set(lofn.runs) == set(runs.loc[runs.status == "ok", "run_id"])  # L(N): finished runs only


def test_a_grid_without_rungs_has_no_estimates(tmp_path):
    from analysis.results import load_runs
    from analysis.sweep_fits import search_estimates

    store = _searched_store(tmp_path)
    assert search_estimates(load_runs(store.dir), None).empty


def test_raising_a_finished_searchs_budget_continues_its_winners_exactly(tmp_path, ray_local, capsys):
    from analysis.results import load_runs
    from orchestrator.cli import main

    def sweep(budget, lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), search=True):
        spec = {"name": "grow", "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                                         "train_tokens": 27_000, "eval_tokens": 1024},
                "grid": {"arch": ["topk"], "n_latents": [64], "k": [4], "lr": list(lrs)},
                "overrides": {"topk": {"train_tokens": budget}},
                "train": {"batch_size": 200, "init_samples": 512, "curve_points_per_decade": 8},
                "eval": {"recovery": False, "refinement": False}, "pack_size": 5, **({"search": {}} if search else {})}
        path = tmp_path / f"grow-{budget}-{len(lrs)}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    results = str(tmp_path / "results")
    assert main(["run", sweep(9_000), "--results", results]) == 0
    short = load_runs(tmp_path / "results" / "grow")
    (winner_lr,) = short.loc[short.status == "ok", "lr"]
    capsys.readouterr()
    assert main(["run", sweep(27_000), "--results", results]) == 0
    out = capsys.readouterr().out
    assert "search: budget raised from 9,000: 1 winner(s) of 5 continue" in out
    grown = load_runs(tmp_path / "results" / "grow")
    assert sorted(grown.status) == ["ok"] + ["stopped"] * 4 and set(grown.run_id).isdisjoint(short.run_id)
    (won,) = grown[grown.status == "ok"].itertuples()
    assert won.lr == winner_lr and won.tokens == 27_000
    # the others kept what they had: the same tokens and nmse as their shorter runs
    assert sorted(grown.loc[grown.status == "stopped", "tokens"]) == sorted(short.loc[short.status == "stopped",
                                                                                     "tokens"])
    # and the winner ends where a run trained from scratch to 27k at its lr ends
    assert main(["run", sweep(27_000, lrs=(winner_lr,), search=False), "--results", str(tmp_path / "scratch")]) == 0
    (scratch,) = load_runs(tmp_path / "scratch" / "grow").itertuples()
    assert scratch.run_id == won.run_id and won.nmse == pytest.approx(scratch.nmse, rel=1e-6)
    capsys.readouterr()
    assert main(["run", sweep(27_000), "--results", results]) == 0  # nothing left to do
    assert "search winner" not in capsys.readouterr().out
