"""The sweep YAML contract: every malformed sweep in tests/bad_sweeps/ fails with one clear message naming
the file, the key and what is allowed, before any work (no Ray, nothing written); planning (grid product,
zip, overrides, stable run ids, packs, FLOPs); the JSON Schema; and the dry run of a valid sweep. List-valued
(per-architecture) overrides and per-architecture budgets: tests/test_plan_overrides.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

import orchestrator.scheduler as scheduler
from orchestrator.cli import main
from orchestrator.plan import RunPlan, data_identity, pack_runs, plan_runs, plan_sweep
from orchestrator.spec import json_schema, parse_spec
from sae_core import SAE
from sae_core.architectures import StepContext, architecture_names

BAD = Path(__file__).parent / "bad_sweeps"
ARCHS = ", ".join(architecture_names())

# case (file stem) -> substrings its message must contain (beyond the file name): the key, and the allowed
# values or a did-you-mean where there are any
CASES: dict[str, list[str]] = {
    "not_yaml": ["not valid YAML", "line 4"],
    "top_level_list": ["must be a mapping", "name, model, hook, data, grid"],
    "empty_file": ["must be a mapping"],
    "missing_name": ["name: Field required"],
    "bad_name_chars": ["name:", "A-Za-z0-9", "'my sweep/../x'"],
    "unknown_top_level_gird": ["gird: unknown key", "did you mean 'grid'?", "allowed: name, model, hook, data, grid"],
    "missing_grid": ["grid: Field required"],
    "missing_data": ["data: Field required"],
    "grid_not_mapping": ["grid:", "valid dictionary"],
    "unknown_data_key_train_token": ["data.train_token: unknown key", "did you mean 'train_tokens'?",
                                     "allowed: text, activations, synthetic"],
    "missing_train_tokens": ["data.train_tokens: Field required"],
    "unknown_hook_key_layer": ["hook.layer: unknown key", "did you mean 'layers'?",
                               "allowed: site, layers, multi_layer"],
    "bad_hook_site": ["hook.site", "'resid_pre', 'resid_post', 'resid_post_ln' or 'mlp_out'", "'resid_pots'"],
    "hook_layers_word": ["hook.layers:", "valid list", "'all'", "(got 'some')"],
    "unknown_train_key_batch_sise": ["train.batch_sise: not a trainer key", "did you mean 'batch_size'?",
                                     "allowed: adam_beta1"],
    "unknown_eval_key_recovry": ["eval.recovry: unknown key", "did you mean 'recovery'?", "allowed: downstream"],
    "unknown_resources_key_gpu": ["resources.gpu: unknown key", "did you mean 'gpus'?",
                                  "allowed: gpus, cpus, memory_gb, custom"],
    "unknown_grid_axis_n_latent": ["unknown axis 'n_latent'", "did you mean 'n_latents'?", "allowed: adam_beta1"],
    "unknown_sae_key": ["sae.normalisation", "allowed:", "normalization"],
    "grid_n_latents_string": ["n_latents", "valid integer", "(got 'big')", "grid point"],
    "train_batch_size_negative": ["train.batch_size", "greater than or equal to 1", "(got -1)"],
    "grid_batch_size_negative": ["train.batch_size", "greater than or equal to 1", "(got -1)",
                                 '"batch_size": -1'],
    "grid_lr_negative": ["train.lr", "finite number > 0 or 'auto'", "(got -3)", '"lr": -3'],
    "grid_lr_word": ["train.lr:", "valid number", "'auto'", "(got 'fast')"],
    "unknown_arch_topkk": ["arch: unknown architecture 'topkk'", "did you mean 'topk'?", f"allowed: {ARCHS}"],
    "missing_arch_axis": ["`arch` axis", f"allowed architectures: {ARCHS}"],
    "both_n_latents_and_expansion_factor": ["exactly one of the axes n_latents and expansion_factor"],
    "neither_n_latents_nor_expansion_factor": ["exactly one of the axes n_latents and expansion_factor"],
    "k_greater_than_n_latents": ["k: must be <= n_latents (32)", "allowed: 1..32", "(got 48)",
                                 '{"arch": "topk", "n_latents": 32, "k": 48}'],
    "multi_k_factor_too_large": ["multi_k_factor", "n_latents (32)", "allowed: multi_k_factor <= 8", "grid point"],
    "axis_applies_to_no_arch": ["grid.l1_coeff", "none of the grid's architectures (topk)",
                                "applies to: gated, prolu, relu"],
    "zip_unequal_lengths": ["zip:", "n_latents, lr", "equal lengths", "(got 3, 2)"],
    "zip_names_non_axis": ["zip: 'lr' is not an axis", "axes: arch, n_latents"],
    "zip_axis_in_two_groups": ["zip: 'lr' appears in two groups"],
    "overrides_arch_not_in_grid": ["overrides.relu: not an architecture of the grid", "allowed: topk"],
    "overrides_key_not_applicable": ["overrides.relu.k: does not apply to relu", "allowed:", "l1_coeff"],
    "overrides_bad_value": ["l1_coeff", "greater than or equal to 0", "(got -1)", 'overrides.relu {"l1_coeff": -1}'],
    "overrides_list_empty": ["overrides.relu.l1_coeff: an empty list", "give at least one value"],
    "overrides_list_zipped": ["overrides.relu.lr: a list makes lr relu's own axis", "zipped with n_latents",
                              "allowed: a scalar override of lr"],
    "train_train_tokens": ["train.train_tokens", "set by data.train_tokens", "overrides.<arch>.train_tokens",
                           "allowed: adam_beta1"],
    "train_lr": ["train.lr", "a grid axis"],
    "two_data_sources": ["data:", "exactly one of data.text (with model), data.activations or data.synthetic",
                         "got activations, synthetic"],
    "no_data_source": ["exactly one of data.text (with model), data.activations or data.synthetic", "got none"],
    "text_without_model": ["model: required with data.text"],
    "text_two_sources": ["data.text", "exactly one of files, dataset, embedded", "got files, embedded"],
    "model_with_synthetic": ["model: give it with data.text only"],
    "activations_file_missing": ["data.activations", "no/such/dir/acts_missing.npy", "file not found"],
    "synthetic_unknown_key": ["data.synthetic.n_feature", "did you mean 'n_features'?", "allowed: d_in, n_features"],
    "synthetic_bad_value": ["data.synthetic.active_per_vector", "(0, n_features=64]", "got 100"],
    "negative_eval_tokens": ["data.eval_tokens", "greater than or equal to 1", "(got -5)"],
    "empty_axis": ["axis 'k' is empty"],
    "jumprelu_target_l0_without_mode": ["target_l0", "sparsity: target_l0", "grid point"],
    "zero_pack_size": ["pack_size", "greater than or equal to 1", "(got 0)"],
    "resources_cpus_zero": ["resources.cpus", "greater than 0", "(got 0)"],
    "unknown_model": ["model:", "./no/such/model_folder", "not found on disk"],
}


def test_every_bad_sweep_file_has_a_case():
    assert sorted(p.stem for p in BAD.glob("*.yaml")) == sorted(CASES)
    assert len(CASES) >= 22


@pytest.fixture
def no_ray(monkeypatch):
    """Reaching Ray is a bug for a bad sweep: everything must fail in plan_sweep, before connect."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad sweep reached Ray")
    monkeypatch.setattr(scheduler, "connect", refuse)


def _run(path: Path, results: Path, dry_run: bool, capsys) -> tuple[int, str, str]:
    argv = ["run", str(path), "--results", str(results)] + (["--dry-run"] if dry_run else [])
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep(case, dry_run, tmp_path, capsys, no_ray):
    path = BAD / f"{case}.yaml"
    results = tmp_path / "results"
    t0 = time.perf_counter()
    rc, out, err = _run(path, results, dry_run, capsys)
    assert time.perf_counter() - t0 < 5, "a bad sweep must fail before any expensive work"
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("sae-scaling: error: ") and err.count("sae-scaling: error:") == 1
    assert err.count("\n") == 1, f"one message on one line, got:\n{err}"
    assert str(path) in err
    for part in CASES[case]:
        assert part in err, f"{part!r} missing from: {err}"
    assert not results.exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_missing_sweep_file(dry_run, tmp_path, capsys, no_ray):
    path = tmp_path / "no_such_sweep.yaml"
    rc, out, err = _run(path, tmp_path / "results", dry_run, capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert f"{path}: sweep file not found" in err
    assert not (tmp_path / "results").exists()


# --- planning --------------------------------------------------------------------------------------------
BASE = {
    "name": "t",
    "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
             "train_tokens": 4096, "eval_tokens": 512},
    "grid": {"arch": ["topk", "relu"], "n_latents": [32, 64], "k": [4, 8], "l1_coeff": [0.01, 0.1]},
    "train": {"batch_size": 512},
}
D_IN = 16


def _with(**changes) -> dict:
    """BASE with dotted keys replaced, e.g. _with(**{"train.batch_size": 256})."""
    spec = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


def _plan(data: dict, layers=(None,)) -> list[RunPlan]:
    return plan_runs(parse_spec(data), D_IN, list(layers))


def _ids(data: dict) -> dict:
    """(arch, n_latents, k, l1_coeff) -> run_id."""
    return {(r.arch, r.n_latents, r.sae.get("k"), r.sae.get("l1_coeff")): r.run_id for r in _plan(data)}


def test_axes_apply_only_to_their_family():
    runs = _plan(BASE)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    topk = sorted((r.n_latents, r.sae["k"]) for r in runs if r.arch == "topk")
    relu = sorted((r.n_latents, r.sae["l1_coeff"]) for r in runs if r.arch == "relu")
    assert topk == [(32, 4), (32, 8), (64, 4), (64, 8)]
    assert relu == [(32, 0.01), (32, 0.1), (64, 0.01), (64, 0.1)]
    assert all("l1_coeff" not in r.sae and "l1_coeff" not in r.axes for r in runs if r.arch == "topk")
    assert all("k" not in r.sae and "k" not in r.axes for r in runs if r.arch == "relu")
    # a train key as an axis applies to every family and multiplies every run
    assert len(_plan(_with(**{"grid.batch_size": [256, 512]}))) == 16


def test_zip_pairs_axes():
    data = _with(**{"grid": {"arch": ["topk"], "n_latents": [32, 64], "lr": [1e-3, 5e-4], "k": [4]}})
    assert len(_plan(data)) == 4  # crossed
    data["zip"] = [["n_latents", "lr"]]
    runs = _plan(data)
    assert sorted((r.n_latents, r.train["lr"]) for r in runs) == [(32, 1e-3), (64, 5e-4)]


def test_expansion_factor_sizes_by_d_in():
    data = _with(grid={"arch": ["topk"], "expansion_factor": [2, 8], "k": [4]})
    runs = _plan(data)
    assert sorted(r.n_latents for r in runs) == [2 * D_IN, 8 * D_IN]
    assert {r.sae["d_in"] for r in runs} == {D_IN}


def test_overrides_win_and_are_recorded():
    data = _with(**{"grid.lr": [1e-3], "overrides": {"relu": {"lr": 5e-5, "l1_coeff": 0.3}}})
    runs = _plan(data)
    relu = [r for r in runs if r.arch == "relu"]
    topk = [r for r in runs if r.arch == "topk"]
    assert len(relu) == 2  # l1_coeff overridden: the l1 axis collapses to one value per n
    assert all(r.train["lr"] == 5e-5 and r.sae["l1_coeff"] == 0.3 for r in relu)
    assert all(r.axes["lr"] == 5e-5 and r.axes["l1_coeff"] == 0.3 for r in relu)
    assert all(r.train["lr"] == 1e-3 and r.axes["lr"] == 1e-3 for r in topk)


def test_run_id_stable_and_sensitive(tmp_path):
    ids = _ids(BASE)
    assert _ids(BASE) == ids
    # key order in the YAML (top level, data, grid) does not matter
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(yaml.safe_dump(BASE, sort_keys=False))
    reordered = {"train": BASE["train"], "grid": dict(reversed(list(BASE["grid"].items()))),
                 "data": dict(reversed(list(BASE["data"].items()))), "name": "t"}
    path_b.write_text(yaml.safe_dump(reordered, sort_keys=False))
    a, b = plan_sweep(path_a, tmp_path / "results"), plan_sweep(path_b, tmp_path / "results")
    key = lambda r: (r.arch, r.n_latents, r.sae.get("k"), r.sae.get("l1_coeff"))  # noqa: E731
    assert {key(r): r.run_id for r in a.runs} == {key(r): r.run_id for r in b.runs} == ids
    assert not (tmp_path / "results").exists()
    # run-time knobs do not change what a run computes
    for knob in ({"data.device": "cpu"}, {"data.batch_rows": 64}, {"train.device": "cpu"}):
        assert _ids(_with(**knob)) == ids, knob
    # every value that determines the result does
    changes = [{"grid.seed": [1]}, {"train.batch_size": 256}, {"eval": {"recovery": False}}, {"data_seed": 1},
               {"data.train_tokens": 8192}, {"data.eval_tokens": 1024}, {"sae": {"normalization": "none"}},
               {"data.synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4, "seed": 3}},
               {"train.lr_warmup_frac": 0.1}]
    for change in changes:
        other = _ids(_with(**change))
        assert other.keys() == ids.keys()
        assert all(other[k] != ids[k] for k in ids), change
    # a change that applies to one family moves only that family's ids
    other = _ids(_with(overrides={"relu": {"lr": 5e-5}}))
    assert all((other[k] == ids[k]) == (k[0] == "topk") for k in ids)


def test_data_identity_excludes_run_time_knobs():
    a = data_identity(parse_spec(BASE))
    b = data_identity(parse_spec(_with(**{"data.device": "cpu", "data.batch_rows": 64})))
    assert a == b
    assert data_identity(parse_spec(_with(data_seed=2))) != a


def test_one_run_per_layer():
    runs = _plan(BASE, layers=[0, 2])
    assert len(runs) == 16 and len({r.run_id for r in runs}) == 16
    assert sorted({r.layer for r in runs}) == [0, 2]
    by_layer = {layer: {(r.arch, r.n_latents, r.sae.get("k"), r.sae.get("l1_coeff")) for r in runs if r.layer == layer}
                for layer in (0, 2)}
    assert by_layer[0] == by_layer[2]
    assert {r.stream for r in runs if r.layer == 0}.isdisjoint({r.stream for r in runs if r.layer == 2})
    # synthetic data has no layers: one run per grid point, layer None
    sweep_runs = _plan(BASE)
    assert {r.layer for r in sweep_runs} == {None} and len(sweep_runs) == 8


def test_pack_runs():
    data = _with(grid={"arch": ["topk"], "n_latents": [32, 64, 128], "k": [4, 8], "batch_size": [256, 512]})
    runs = _plan(data)
    assert len(runs) == 12
    packs = pack_runs(runs, 4)
    assert sorted(r.run_id for p in packs for r in p) == sorted(r.run_id for r in runs)
    assert all(len(p) <= 4 for p in packs)
    assert len(packs) == 4  # two streams (batch sizes) of 6 runs each: 4 + 2 per stream
    for p in packs:
        assert len({r.stream for r in p}) == 1
        assert len({r.train["batch_size"] for r in p}) == 1
        assert [r.n_latents for r in p] == sorted((r.n_latents for r in p), reverse=True)
    for bs in (256, 512):
        mine = [p for p in packs if p[0].train["batch_size"] == bs]
        assert [len(p) for p in mine] == [4, 2]
        assert [r.n_latents for p in mine for r in p] == [128, 128, 64, 64, 32, 32]  # largest first
    assert len(pack_runs(runs, 1)) == 12 and len(pack_runs(runs, 100)) == 2


def test_packs_fit_the_worker_memory():
    runs = _plan(_with(grid={"arch": ["topk"], "n_latents": [32, 64, 128], "k": [4, 8]}))
    need = {r.n_latents: r.memory_bytes() for r in runs}
    assert need[128] == 4 * (8 * 128 * 16 + 2 * 512 * 128)  # weights, grads, 2 Adam moments; batch x n twice
    budget = 2 * need[128] + need[64]
    packs = pack_runs(runs, 100, budget)
    assert [[r.n_latents for r in p] for p in packs] == [[128, 128, 64], [64, 32, 32]]
    assert all(sum(r.memory_bytes() for r in p) <= budget for p in packs)
    assert [len(p) for p in pack_runs(runs, 100, 1)] == [1] * 6  # too small for any: one run per pack


# the formulas of docs/scaling-laws.md, "Compute accounting" (every architecture's step is also checked against
# its own flops_per_vector in tests/test_architectures.py)
DOCUMENTED_FLOPS = {
    "topk": lambda d, n, s: 2 * d * n + 10 * d * s["k"],
    "batchtopk": lambda d, n, s: 2 * d * n + 10 * d * s["k"],
    # 2dn + 16dk + 30dk for factor 4
    "multi_topk": lambda d, n, s: 2 * d * n + 4 * d * s["k"] * s["multi_k_factor"]
    + 6 * d * (s["k"] + s["k"] * s["multi_k_factor"]),
    "relu": lambda d, n, s: 12 * d * n, "prolu": lambda d, n, s: 12 * d * n, "jumprelu": lambda d, n, s: 12 * d * n,
    "gated": lambda d, n, s: 16 * d * n,
}


def _documented_flops(arch: str, sae: dict) -> float:
    return DOCUMENTED_FLOPS[arch](sae["d_in"], sae["n_latents"], sae)


def test_flops_match_the_documented_formula_and_the_loss():
    data = _with(grid={"arch": list(DOCUMENTED_FLOPS), "n_latents": [64], "k": [4]})
    runs = _plan(data)
    assert sorted(r.arch for r in runs) == sorted(DOCUMENTED_FLOPS)
    torch.manual_seed(0)
    x = torch.randn(8, D_IN)
    for run in runs:
        tokens = run.train["train_tokens"]
        assert tokens == BASE["data"]["train_tokens"]
        expected = _documented_flops(run.arch, run.sae)
        if run.arch == "multi_topk":
            assert expected == 2 * 16 * 64 + 46 * 16 * 4
        assert run.flops() == pytest.approx(tokens * expected), run.arch
        arch = SAE(run.sae).net
        out = arch.loss(x, StepContext(mse_scale=1.0))
        assert out.flops / x.shape[0] == pytest.approx(expected), run.arch


# --- JSON Schema and dry run --------------------------------------------------------------------------------
def test_json_schema(capsys):
    schema = json.loads(json_schema())
    assert {"name", "data", "grid", "train", "hook"} <= set(schema["properties"])
    assert "name" in schema["required"]
    assert main(["schema"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == schema and err == ""


def test_dry_run_prints_runs_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scheduler, "connect", lambda *a, **k: pytest.fail("a dry run reached Ray"))
    data = _with(grid={"arch": ["topk", "relu"], "n_latents": [32, 64], "k": [4], "l1_coeff": [0.01]})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    expected = plan_sweep(path, results).runs
    assert len(expected) == 4
    assert main(["run", str(path), "--results", str(results), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["run_id", "arch"]
    body, total = lines[1:-1], lines[-1]
    assert len(body) == 4
    assert [line.split()[0] for line in body] == [r.run_id for r in expected]
    for line, run in zip(body, expected):
        assert line.split()[1] == run.arch and str(run.n_latents) in line.split() and line.endswith("pending: new grid point")
    assert total.startswith("4 runs (0 done), ")
    flops = sum(r.flops() for r in expected)
    assert f"{flops:.2e} FLOPs in all" in total
    assert not results.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]
