"""The quickstart end to end on fewer tokens: the same sweep file and code path as `make quickstart`
(embedded MiniLM, embedded corpus, activation cache, Ray, fit, figures, report)."""
import json
from pathlib import Path

import yaml

from analysis import load_curves, load_recovery, load_runs
from orchestrator.cli import main
from orchestrator.scheduler import run_sweep

QUICKSTART = Path(__file__).parent.parent / "sweeps" / "quickstart.yaml"


def test_shortened_quickstart_end_to_end(tmp_path, ray_local, capsys):
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["data"].update(train_tokens=12_000, eval_tokens=2048)
    spec["eval"].update(downstream_tokens=256)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    assert run_sweep(path, results, echo=lambda s: None) == 0
    sweep = results / "quickstart"

    runs = load_runs(sweep)
    assert len(runs) == 14 and (runs.status == "ok").all()
    assert sorted(runs.arch.value_counts().items()) == [("gated", 3), ("relu", 3), ("topk", 8)]
    assert (runs.downstream_metric == "embedding_cosine").all() and runs.downstream_loss.notna().all()
    assert runs.ce_loss_score.isna().all()  # an encoder: no CE
    topk = runs[runs.arch == "topk"]
    assert (topk.l0 == topk.k.astype(float)).all()
    curves = load_curves(sweep)
    last = curves.sort_values("step").groupby("run_id").last()
    assert (last.loc[runs.run_id, "tokens"].to_numpy() == runs.tokens.to_numpy()).all()
    assert set(load_recovery(sweep).run_id) == set(runs.run_id)

    assert main(["fit", str(sweep)]) == 0
    fits = json.loads((sweep / "fits" / "fits.json").read_text())["fits"]
    assert any(name.startswith("L(N) arch=topk, k=32") for name in fits)
    assert any(name.startswith("L(n,k) arch=topk") for name in fits)
    assert (sweep / "fits" / "fits.parquet").is_file()

    assert main(["figures", str(sweep)]) == 0
    figures = sweep / "figures"
    for name in ("frontier", "lofn", "loc", "curves", "recovery"):
        assert (figures / f"{name}.png").is_file() and (figures / f"{name}.pdf").is_file(), name
    report = (figures / "report.html").read_text()
    assert "Fitted laws" in report and report.count("data:image/png;base64") >= 5
    assert all(rid in report for rid in runs.run_id)
    capsys.readouterr()
