"""Subject models as a grid axis (`model: [...]`, one activation stream per model) and figures across sweeps
(`sae-scaling figures A B --out DIR`): Gao et al. 2024, §3.5, L(N) per subject model with its exponent."""
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from analysis.figures import fig_subject_models  # noqa: E402
from analysis.results import load_runs  # noqa: E402
from analysis.sweep_fits import fit_sweep  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.plan import dry_run, plan_sweep  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402
from orchestrator.store import RUN_SCHEMA, ResultsStore  # noqa: E402
from sae_core.errors import ConfigError  # noqa: E402

NS = [256, 512, 1024, 2048]
LAWS = {"m-small": (0.05, 3.0, -0.3), "m-large": (0.08, 4.0, -0.2)}  # c, a, b of each model's L(N)


def _sweep(models, hook=None, **extra):
    return {"name": "subj", "model": models, "hook": hook or {"site": "resid_post", "layers": [1]},
            "data": {"text": {"embedded": True}, "context_length": 16, "train_tokens": 2048,
                     "eval_tokens": 256},
            "grid": {"arch": ["topk"], "n_latents": [16, 32, 64], "k": [4]},
            "train": {"batch_size": 128, "init_samples": 256, "curve_points_per_decade": 2},
            "eval": {"downstream_tokens": 128, "recovery_downstream": False, "refinement_vectors": 64},
            "pack_size": 3, **extra}


def _write(tmp_path, name, spec):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_model_list_plans_one_stream_per_model_each_with_its_hook(tmp_path, tiny_models):
    gpt2, neox = str(tiny_models["gpt2"]), str(tiny_models["neox"])
    spec = _sweep([gpt2, {"name": neox, "hook": {"site": "resid_post", "layers": [2]}}])
    sweep = plan_sweep(_write(tmp_path, "both", spec), tmp_path / "results")
    assert len(sweep.runs) == 6
    assert {r.model for r in sweep.runs} == {gpt2, neox}
    assert all(r.axes["model"] == r.model for r in sweep.runs)
    assert {(r.model, r.layer) for r in sweep.runs} == {(gpt2, 1), (neox, 2)}
    assert len({r.stream for r in sweep.runs}) == 2  # one activation stream per model, shared by its widths
    assert len({r.run_id for r in sweep.runs}) == 6
    # each model's single-model sweep is what its workers get
    for model, (one, data) in sweep.models.items():
        assert one.model == model and data.d_in == 32
    # a grid point shared with a single-model sweep is the same run (same id: it is trained once)
    single = plan_sweep(_write(tmp_path, "one", _sweep(gpt2)), tmp_path / "results")
    assert {r.run_id for r in single.runs} == {r.run_id for r in sweep.runs if r.model == gpt2}
    lines = []
    dry_run(sweep, lines.append)
    assert lines[0].split()[:3] == ["run_id", "model", "arch"]
    assert sum(neox in line for line in lines) == 3
    assert "(2 models)" in lines[-1]


@pytest.mark.parametrize("models, data, expected", [
    (["a", "a"], None, ["model: a listed twice"]),
    ([], None, ["model: an empty list"]),
    (["a", "b"], {"synthetic": {"d_in": 8}, "train_tokens": 10}, ["model: give it with data.text only"]),
    ([{"name": "a", "layers": [1]}], None, ["model: entry 0: unknown key 'layers'", "allowed: name, hook"]),
])
def test_a_bad_model_list_is_refused_naming_the_key(models, data, expected):
    spec = {"name": "x", "model": models, "data": data or {"text": {"embedded": True}, "train_tokens": 10},
            "grid": {"arch": ["topk"], "n_latents": [8]}}
    with pytest.raises(ConfigError) as err:
        parse_spec(spec, "s.yaml")
    assert str(err.value).startswith("s.yaml: ")
    for part in expected:
        assert part in str(err.value)


def _store(root, name, model, laws=LAWS, shared=None):
    store = ResultsStore(root, name)
    store.save_spec(f"name: {name}\nmodel: {model}\n")
    c, a, b = laws[model]
    for n in NS:
        for seed in (0, 1):
            nmse = (c + a * n ** b) * (1 + 0.002 * (seed - 0.5))
            rid = shared if shared and n == NS[0] and seed == 0 else f"{name}-n{n}-s{seed}"
            row = {"run_id": rid, "sweep": name, "status": "ok", "arch": "topk", "n_latents": n, "k": 8, "lr": 1e-3,
                   "seed": seed, "model": model, "hook": "resid_post", "layer": 3, "d_in": 16, "tokens": 10**6,
                   "flops": 1e12, "nmse": nmse, "l0": 8.0, "dead_frac": 0.0,
                   "config_json": json.dumps({"axes": {"n_latents": n, "seed": seed}})}
            store.write_run({k: row.get(k) for k in RUN_SCHEMA} | row)
    return store.dir


def test_figures_across_sweeps_draw_lofn_per_model_with_its_exponent(tmp_path, capsys):
    small, large = _store(tmp_path, "small", "m-small"), _store(tmp_path, "large", "m-large")
    runs = load_runs([small, large])
    assert set(runs["model"]) == set(LAWS) and len(runs) == 2 * 2 * len(NS)
    fits, _ = fit_sweep([small, large])
    for model, (_, _, b) in LAWS.items():
        (fit,) = [f for f in fits.values() if f.law == "lofn" and f.group.get("model") == model]
        assert fit.params["b"] == pytest.approx(b, abs=0.02)
    fig = fig_subject_models(runs, (fits, {}))
    ax = fig.axes[0]
    labels = [t.get_text().replace("\n    ", " ") for leg in fig.legends for t in leg.get_texts()]
    for model, (_, _, b) in LAWS.items():
        (label,) = [t for t in labels if t.startswith(model)]
        assert float(label.split("exponent ")[1].split()[0]) == pytest.approx(b, abs=0.02)
    assert len([ln for ln in ax.get_lines() if ln.get_gid() == "fit"]) == 2

    out = tmp_path / "compare"
    assert main(["figures", str(small), str(large), "--out", str(out)]) == 0
    assert (out / "subject_models.png").is_file()
    report = (out / "report.html").read_text()
    assert "Sweeps small, large" in report and "model: m-small" in report and "model: m-large" in report
    assert main(["fit", str(small), str(large), "--out", str(out)]) == 0
    assert any("model=m-large" in name for name in json.loads((out / "fits.json").read_text())["fits"])
    # each sweep's own folder is left as it was: their fits live in --out
    assert not (small / "fits").exists() and not (large / "fits").exists()
    capsys.readouterr()
    assert main(["figures", str(small), str(large)]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_run_two_sweeps_share_counts_once(tmp_path):
    a = _store(tmp_path, "a", "m-small", shared="same")
    b = _store(tmp_path, "b", "m-small", shared="same")
    runs = load_runs([a, b])
    assert (runs["run_id"] == "same").sum() == 1 and len(runs) == 2 * 2 * len(NS) - 1


def test_one_model_skips_the_figure_with_its_reason(tmp_path):
    runs = load_runs(_store(tmp_path, "small", "m-small"))
    with pytest.raises(Exception, match="one subject model"):
        fig_subject_models(runs)


def test_a_model_list_trains_and_records_each_model(tmp_path, tiny_models, ray_local):
    gpt2, neox = str(tiny_models["gpt2"]), str(tiny_models["neox"])
    spec = _sweep([gpt2, {"name": neox, "hook": {"site": "resid_post", "layers": [2]}}])
    path = _write(tmp_path, "both", spec)
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0
    runs = load_runs(tmp_path / "results" / "subj")
    assert len(runs) == 6 and set(runs["status"]) == {"ok"}
    assert {(m, int(layer)) for m, layer in zip(runs["model"], runs["layer"])} == {(gpt2, 1), (neox, 2)}
    assert runs["downstream_loss"].notna().all()  # each run spliced into its own model
    assert main(["figures", str(tmp_path / "results" / "subj")]) == 0
    assert (tmp_path / "results" / "subj" / "figures" / "subject_models.png").is_file()
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0  # resumes: nothing to do
    assert np.isfinite(runs["nmse"]).all()
