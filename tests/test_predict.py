"""`sae-scaling predict`: the fitted laws at a size or compute the sweep did not train, with 95% intervals, the
extrapolation factor, and the best lr from the lr law (analysis/predict.py)."""
import pytest
from test_sweep_fits import LRS, NS, A, B, C, sweep  # noqa: F401  (the fixture)

from analysis.predict import predict
from analysis.sweep_fits import sweep_fits
from orchestrator.cli import main


def test_predictions_follow_the_planted_law_with_intervals_and_the_best_lr(sweep, capsys):  # noqa: F811
    n = 2**16
    preds = {p.law: p for p in predict(sweep.dir, n_latents=n)}
    (lofn,) = [p for name, p in preds.items() if name.startswith("L(N)")]
    want = C + A * n ** B
    assert lofn.value == pytest.approx(want, rel=0.02)
    assert lofn.low <= lofn.value <= lofn.high and lofn.low < want * 1.02 and lofn.high > want * 0.98
    assert lofn.beyond == pytest.approx(n / max(NS))
    assert lofn.quantity == "nmse" and lofn.at == {"n_latents": float(n)}
    # the lr law: every width's best lr is 3e-4 in this sweep, so its prediction at a new width is too
    (lr,) = [p for name, p in preds.items() if name.startswith("lr*(n)")]
    assert lr.quantity == "best lr" and lr.value == pytest.approx(3e-4, rel=0.2)
    assert min(LRS) <= lr.value <= max(LRS)
    fits, _ = sweep_fits(sweep.dir)
    assert lofn.value == pytest.approx(fits[lofn.law].predict(n_latents=n))

    assert main(["predict", str(sweep.dir), "--n-latents", "65536"]) == 0
    out = capsys.readouterr().out
    assert "nmse" in out and "95% interval" in out and "best lr" in out and "16x beyond the fitted range" in out
    # inside the fitted range: no extrapolation note
    assert main(["predict", str(sweep.dir), "--n-latents", "1024"]) == 0
    assert "beyond" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--k", "8"], "give --n-latents"),
    (["--flops", "1e30", "--k", "64"], "no fitted law takes these inputs"),
])
def test_predict_says_what_it_needs(sweep, capsys, argv, message):  # noqa: F811
    assert main(["predict", str(sweep.dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many", "inf"])
def test_predict_refuses_a_bad_width(sweep, capsys, value):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(sweep.dir), "--n-latents", value])
    assert exit_.value.code == 2 and "allowed: a positive" in capsys.readouterr().err


def test_every_command_prints_its_help(capsys):
    from orchestrator.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "predict" in commands
    for argv in ([], *([c] for c in commands)):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
    assert "predict" in capsys.readouterr().out
