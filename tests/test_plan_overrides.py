"""Per-architecture overrides: a list is that architecture's own axis (Gao et al. 2024, App. B.2 gives each
L1 baseline its own lambda and lr grid), a scalar collapses the grid's axis as before, and train_tokens may
be overridden per architecture (a budget over the data's pool: B.2's "8 epochs of 6.4 billion tokens").
Bad lists are refused at plan time naming the sweep file and key; the shipped Gao baselines sweep plans
exactly B.2's grids."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.plan import plan_runs
from orchestrator.spec import load_spec, parse_spec
from sae_core.errors import ConfigError

D_IN = 16
BASE = {
    "name": "t",
    "data": {"synthetic": {"d_in": D_IN, "n_features": 64, "active_per_vector": 4},
             "train_tokens": 4096, "eval_tokens": 512},
    "grid": {"arch": ["relu", "gated", "topk"], "n_latents": [32], "k": [4, 8], "l1_coeff": [0.01],
             "lr": [1e-3]},
    "train": {"batch_size": 512},
}


def _spec(**changes) -> dict:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def _plan(data: dict):
    return plan_runs(parse_spec(data, "sweep.yaml"), D_IN, [None], source="sweep.yaml")


def _points(runs) -> set:
    return {(r.arch, r.sae.get("k"), r.sae.get("l1_coeff"), r.train["lr"], r.train["train_tokens"]) for r in runs}


def test_list_overrides_are_each_architectures_own_axes():
    runs = _plan(_spec(overrides={"relu": {"l1_coeff": [0.1, 0.2, 0.3], "lr": [1e-4, 2e-4]},
                                  "gated": {"l1_coeff": [0.5, 0.6], "lr": 5e-5}}))
    expected = ({("relu", None, l1, lr, 4096) for l1 in (0.1, 0.2, 0.3) for lr in (1e-4, 2e-4)}
                | {("gated", None, l1, 5e-5, 4096) for l1 in (0.5, 0.6)}
                | {("topk", k, None, 1e-3, 4096) for k in (4, 8)})
    assert _points(runs) == expected
    assert len(runs) == len(expected) == 6 + 2 + 2  # nothing twice, nothing of the grid's relu/gated values
    assert len({r.run_id for r in runs}) == len(runs)
    relu = [r for r in runs if r.arch == "relu"]
    assert all(r.axes["l1_coeff"] == r.sae["l1_coeff"] and r.axes["lr"] == r.train["lr"] for r in relu)


def test_list_override_adds_an_axis_only_for_its_architecture():
    data = _spec(overrides={"relu": {"seed": [0, 1, 2]}})
    runs = _plan(data)
    assert sorted(r.train["seed"] for r in runs if r.arch == "relu") == [0, 1, 2]
    assert [r.train["seed"] for r in runs if r.arch != "relu"] == [0, 0, 0]  # gated, topk k=4, k=8
    # a key of one family only: ProLU's gradient, swept for prolu and absent elsewhere
    data = _spec(overrides={"prolu": {"gradient": ["ste", "relu"]}})
    data["grid"]["arch"] = ["prolu", "topk"]
    runs = _plan(data)
    assert sorted(r.sae["gradient"] for r in runs if r.arch == "prolu") == ["relu", "ste"]
    assert all("gradient" not in r.sae for r in runs if r.arch == "topk")


def test_a_list_equal_to_the_grid_axis_or_a_one_element_list_keeps_the_run_ids():
    ids = {r.run_id for r in _plan(BASE)}
    assert {r.run_id for r in _plan(_spec(overrides={"relu": {"l1_coeff": [0.01], "lr": [1e-3]}}))} == ids
    scalar = {r.run_id for r in _plan(_spec(overrides={"relu": {"lr": 5e-4}}))}
    assert {r.run_id for r in _plan(_spec(overrides={"relu": {"lr": [5e-4]}}))} == scalar
    # the list moves only its own architecture's runs
    moved = {r.arch: r.run_id for r in _plan(_spec(overrides={"relu": {"lr": [5e-4]}}))}
    before = {r.arch: r.run_id for r in _plan(BASE) if r.arch != "topk"}
    assert moved["relu"] != before["relu"] and moved["gated"] == before["gated"]


def test_train_tokens_override_is_a_per_architecture_budget_in_its_own_stream():
    runs = _plan(_spec(overrides={"relu": {"train_tokens": 8 * 4096}, "gated": {"train_tokens": [4096, 6 * 4096]}}))
    budgets = sorted((r.arch, r.train["train_tokens"]) for r in runs)
    assert budgets == [("gated", 4096), ("gated", 6 * 4096), ("relu", 8 * 4096), ("topk", 4096), ("topk", 4096)]
    stream = {(r.arch, r.train["train_tokens"]): r.stream for r in runs}
    assert stream[("gated", 4096)] == stream[("topk", 4096)]  # same data, batch and budget: one stream
    assert len({stream[("gated", 6 * 4096)], stream[("relu", 8 * 4096)], stream[("topk", 4096)]}) == 3
    relu = next(r for r in runs if r.arch == "relu")
    base = next(r for r in _plan(BASE) if r.arch == "relu")
    assert relu.flops() == pytest.approx(8 * base.flops())
    assert relu.run_id != base.run_id
    # the data (the pool) is untouched: the default-budget runs keep their ids
    assert {r.run_id for r in runs if r.arch == "topk"} == {r.run_id for r in _plan(BASE) if r.arch == "topk"}


def test_train_tokens_stays_out_of_the_train_section():
    with pytest.raises(ConfigError, match=r"train\.train_tokens.*overrides\.<arch>\.train_tokens"):
        parse_spec(_spec(train={"batch_size": 512, "train_tokens": 8192}), "sweep.yaml")


@pytest.mark.parametrize("overrides, zipped, parts", [
    ({"relu": {"lr": []}}, False, ["overrides.relu.lr", "empty list", "at least one value"]),
    ({"relu": {"l1_coeff": [0.1], "lr": [1e-4, 2e-4]}}, True,
     ["overrides.relu.lr", "zipped with n_latents", "zip: [n_latents, lr]", "allowed: a scalar override"]),
    ({"relu": {"k": [4, 8]}}, False, ["overrides.relu.k", "does not apply to relu"]),
    ({"relu": {"train_tokens": [0]}}, False, ["train.train_tokens", "greater than or equal to 1",
                                               'overrides.relu {"train_tokens": 0}']),
])
def test_bad_list_overrides_name_the_file_and_key(tmp_path, overrides, zipped, parts):
    data = _spec(overrides=overrides)
    if zipped:
        data["grid"]["n_latents"], data["grid"]["lr"] = [32, 64], [1e-3, 5e-4]
        data["zip"] = [["n_latents", "lr"]]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        spec = load_spec(path)
        plan_runs(spec, D_IN, [None], source=str(path))
    message = str(err.value)
    assert str(path) in message
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


def test_a_scalar_override_of_a_zipped_key_still_works():
    data = _spec(overrides={"relu": {"lr": 5e-5}})
    data["grid"]["n_latents"], data["grid"]["lr"] = [32, 64], [1e-3, 5e-4]
    data["zip"] = [["n_latents", "lr"]]
    runs = _plan(data)
    assert sorted((r.n_latents, r.train["lr"]) for r in runs if r.arch == "relu") == [(32, 5e-5), (64, 5e-5)]
    assert sorted((r.n_latents, r.train["lr"]) for r in runs if r.arch == "topk") == [
        (32, 1e-3), (32, 1e-3), (64, 5e-4), (64, 5e-4)]


# --- the shipped sweeps that use them ------------------------------------------------------------------------
SWEEPS = Path(__file__).parent.parent / "sweeps"


def test_gao_baselines_sweep_plans_appendix_b2():
    spec = load_spec(SWEEPS / "gao2024_baselines.yaml")
    runs = plan_runs(spec, 768, [8])
    grid = {arch: {(r.sae["l1_coeff"], r.train["lr"], r.sae.get("gradient")) for r in runs if r.arch == arch}
            for arch in ("relu", "gated", "prolu")}
    relu_l1, relu_lr = [1.7e-3, 3.1e-3, 5e-3, 1e-2, 1.7e-2], [5e-5, 1e-4, 2e-4, 4e-4]
    gated_l1, l1_lr = [1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2], [2.5e-5, 5e-5, 1e-4]
    prolu_l1 = [5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2]
    assert grid["relu"] == {(a, b, None) for a in relu_l1 for b in relu_lr}
    assert grid["gated"] == {(a, b, None) for a in gated_l1 for b in l1_lr}
    assert grid["prolu"] == {(a, b, g) for a in prolu_l1 for b in l1_lr for g in ("ste", "relu")}
    assert sum(r.arch in grid for r in runs) == 20 + 15 + 36 == len([r for r in runs if r.arch != "topk"])
    pool = spec.data.train_tokens
    assert pool == 6_400_000_000
    assert {r.arch: r.train["train_tokens"] for r in runs} == {
        "relu": 8 * pool, "gated": 6 * pool, "prolu": 6 * pool, "topk": pool}
    assert {r.train["batch_size"] for r in runs} == {131072}
    assert all(r.train["resample_dead"] in (None, 4) and r.sae["l1_warmup_frac"] == 0 for r in runs
               if r.arch in grid)
    assert spec.data.drop_first == 0 and spec.data.context_length == 64 and spec.hook.site == "resid_post_ln"


def test_lawson_sweep_counts_tokens_and_vectors():
    spec = load_spec(SWEEPS / "lawson2024_mlsae.yaml")
    runs = plan_runs(spec, 512, [None])
    layers = 6  # Pythia-70m
    assert spec.data.train_tokens == 1_000_000_000  # the paper's 1B tokens: the pool of positions
    assert {r.train["train_tokens"] for r in runs} == {1_000_000_000 * layers}  # one epoch, in vectors
    assert {r.train["batch_size"] for r in runs} == {131072 * layers}  # "131072 tokens (64 sequences)"
    assert {r.train["lr"] for r in runs} == {1e-4}
    assert {(r.train["autocast"], r.train["grad_clip"], r.train["ema_decay"]) for r in runs} == {("fp16", None, None)}
    assert {(r.train["init_encoder_scale"], r.train["adam_eps"]) for r in runs} == {(1.0, 6.25e-10)}
    assert spec.data.context_length == 2048 and spec.data.drop_first == 0 and spec.data.cache is False
    assert {r.sae["normalization"] for r in runs} == {"standardize"}


@pytest.mark.parametrize("name", ["gao2024_gpt2_lofn", "gao2024_lr", "gao2024_sharded", "gao2024_baselines",
                                  "leask2025_family"])
def test_gpt2_sweeps_keep_the_first_position(name):
    """Gao et al. keep every position (App. B footnote 20: normalising down-weights the first one)."""
    path = SWEEPS / f"{name}.yaml"
    assert load_spec(path).data.drop_first == 0
    assert "drop_first" not in yaml.safe_load(path.read_text())["data"]
