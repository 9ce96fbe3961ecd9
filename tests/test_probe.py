"""Probe loss (Gao et al. 2024, §4): the batched Newton fitter against known answers and a scipy reference."""
import keyword

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from sae_core.evaluation.probe import entropy, fit_probes
from sae_core.evaluation.probe_tasks import task_labels, usable


def labels(n, rate=0.2, seed=0):
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < rate).float()


def reference(z: np.ndarray, y: np.ndarray, l2=1e-4) -> float:
    """The same penalised fit in float64 by scipy: standardised latent, L2 on w, BCE reported without it."""
    s = z.std()
    z = (z - z.mean()) / s if s > 1e-12 else z * 0

    def obj(t):
        a = t[0] * z + t[1]
        return np.mean(np.logaddexp(0, a) - y * a) + 0.5 * l2 * t[0] ** 2
    t = minimize(obj, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
    a = t[0] * z + t[1]
    return float(np.mean(np.logaddexp(0, a) - y * a))


def test_label_latent_near_zero_and_constant_latent_gives_entropy():
    y = labels(2048)
    z = torch.stack([y, torch.full_like(y, 3.0), torch.zeros_like(y)], dim=1)
    fit = fit_probes(z, y)
    assert fit.losses[0] < 0.05 and fit.best == 0
    h = entropy(float(y.mean()))
    assert abs(fit.losses[1] - h) < 1e-6 and abs(fit.losses[2] - h) < 1e-6


def test_agrees_with_scipy_on_random_latents():
    y = labels(1024, 0.3, seed=1)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1024, 5, generator=g)
    z[:, 1] += 1.5 * y
    z[:, 2] = torch.relu(z[:, 2] + y - 1.0) * 4  # sparse and non-negative, as SAE latents
    z[:, 3] = (torch.rand(1024, generator=g) < 0.02) * y  # nearly separating
    fit = fit_probes(z, y)
    for i in range(5):
        assert fit.losses[i] == pytest.approx(reference(z[:, i].double().numpy(), y.double().numpy()), abs=1e-4)


def test_many_latents_run_in_chunks():
    y = labels(64, 0.5)
    z = torch.relu(torch.randn(64, 1 << 17) - 1.5)
    z[:, 12345] = y * 2
    fit = fit_probes(z, y)
    assert fit.losses.shape == (1 << 17,) and fit.best == 12345


def test_builtin_tasks_from_token_strings(tiny_models):
    from sae_core.lm import load_model
    tok = load_model(str(tiny_models["gpt2"])).tokenizer
    ids = tok("Hello 42 >>> for x in y: pass", add_special_tokens=False)["input_ids"]
    rows = np.array([ids])
    got = task_labels(tok, rows, np.ones_like(rows, dtype=bool))
    strings = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)]
    assert [s for s, d in zip(strings, got["digit"]) if d] == [s for s in strings if any(c.isdigit() for c in s)]
    assert got["capitalised"][0]
    assert list(got["python_keyword"]) == [s.strip() in keyword.kwlist for s in strings]
    first_after = next(i for i, s in enumerate(strings) if ">" in s)
    assert not got["doctest"][:first_after + 1].any() and got["doctest"][-1]
    assert set(usable({"a": np.zeros(200, bool), "b": np.arange(200) < 20})) == {"b"}


def test_evaluate_run_adds_probe_columns_and_table(tiny_models):
    from test_downstream import evaluator, held_out, topk_sae, vectors

    from sae_core.evaluation.run import EvalConfig, evaluate_run
    from sae_core.lm import load_model
    lm = load_model(str(tiny_models["gpt2"]))
    tokens, excluded = held_out(lm, rows=40)
    sae = topk_sae(hook={"model": lm.name, "site": "resid_post", "layers": [1]})
    x, _ = vectors(lm, tokens, excluded, "resid_post", [1])
    res = evaluate_run(sae, x, EvalConfig(recovery=False, refinement=False, probe=True), [1], evaluator(lm, tokens, excluded))
    rows = res.tables["probes"]
    assert rows and all(0.01 <= r["base_rate"] <= 0.99 and r["loss"] <= entropy(r["base_rate"]) + 1e-9 for r in rows)
    assert all(r["level"] == "token" and r["source"] == "builtin" for r in rows)
    assert res.metrics["probe_loss"] == pytest.approx(np.mean([r["loss"] for r in rows]))
    assert res.metrics["probe_loss_baseline"] is not None
    off = evaluate_run(sae, x, EvalConfig(recovery=False, refinement=False, probe=True), [], None, "no model")
    assert off.metrics["probe_loss"] is None and off.tables["probes"] == []


def test_probe_figure_draws_loss_vs_width_per_k_and_vs_l0_per_family_over_the_baseline():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from analysis.figures import SkipFigure, fig_probe

    rows = []
    for n in (256, 512, 1024):
        for k in (8, 32):
            rows.append({"run_id": f"t{n}_{k}", "arch": "topk", "n_latents": n, "k": k, "l0": float(k),
                         "nmse": 0.1, "probe_loss": 0.3 - 0.01 * k / 8 - n / 1e4, "probe_loss_baseline": 0.35})
        rows.append({"run_id": f"r{n}", "arch": "relu", "n_latents": n, "l1_coeff": 0.1, "l0": 50.0, "nmse": 0.2,
                     "probe_loss": 0.32, "probe_loss_baseline": 0.35})
    runs = pd.DataFrame(rows).assign(status="ok", lr=1e-3, seed=0)
    fig = fig_probe(runs)
    left, right = fig.axes[:2]
    series = [ln for ln in left.get_lines() if ln.get_gid() == "series"]
    assert len(series) == 3  # topk k=8, topk k=32, relu's best per width
    k8 = next(ln for ln in series if "k=8" in ln.get_label())
    assert list(k8.get_xdata()) == [256, 512, 1024]
    assert list(k8.get_ydata()) == pytest.approx([0.3 - 0.01 - n / 1e4 for n in (256, 512, 1024)])
    points = {ln.get_label(): ln for ln in right.get_lines() if ln.get_gid() == "points"}
    assert set(points) == {"topk", "relu"} and sorted(points["topk"].get_xdata()) == [8] * 3 + [32] * 3
    for ax in (left, right):
        (base,) = [ln for ln in ax.get_lines() if ln.get_gid() == "baseline"]
        assert list(base.get_ydata()) == [0.35, 0.35]
    plt.close(fig)
    with pytest.raises(SkipFigure, match="eval.probe off"):
        fig_probe(runs.assign(probe_loss=None))
