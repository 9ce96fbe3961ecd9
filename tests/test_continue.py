"""A raised budget continues the shorter run: the new run starts from its checkpoint and ends where a run
trained from scratch to the new budget ends (orchestrator.plan.continuations, sae_core.trainer.continuable)."""
from __future__ import annotations

import pytest
import torch
import yaml

from orchestrator.cli import main


def _sweep(tmp_path, budget: int, **train) -> str:
    spec = {"name": "grow", "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                                     "train_tokens": 12_000, "eval_tokens": 1024},
            "grid": {"arch": ["topk"], "n_latents": [32], "k": [4], "lr": [2e-3]},
            "overrides": {"topk": {"train_tokens": budget}},
            "train": {"batch_size": 200, "init_samples": 512, **train},
            "eval": {"recovery": False, "refinement": False}}
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _only(results):
    from analysis.results import load_runs
    from sae_core.sae import SAE

    runs = load_runs(results / "grow")
    row = runs.iloc[0]
    return row, SAE.load(results / "grow" / "saes" / row.run_id)


def test_a_raised_budget_continues_the_shorter_run_exactly(tmp_path, ray_local, capsys):
    results = tmp_path / "results"
    assert main(["run", _sweep(tmp_path, 6_000), "--results", str(results)]) == 0
    short, _ = _only(results)
    longer = _sweep(tmp_path, 18_000)  # epochs over the same 12k-vector pool
    capsys.readouterr()
    assert main(["run", longer, "--results", str(results), "--dry-run"]) == 0
    assert f"budget raised from run {short.run_id}'s 6,000 tokens" in capsys.readouterr().out
    assert main(["run", longer, "--results", str(results)]) == 0
    assert f"continues run {short.run_id} from its checkpoint at 6,000 tokens" in capsys.readouterr().out
    grown, grown_sae = _only(results)
    assert grown.run_id != short.run_id and grown.tokens == 18_000

    scratch_dir = tmp_path / "scratch"
    assert main(["run", longer, "--results", str(scratch_dir)]) == 0
    assert "continues run" not in capsys.readouterr().out
    scratch, scratch_sae = _only(scratch_dir)
    assert scratch.run_id == grown.run_id
    assert grown.nmse == pytest.approx(scratch.nmse, rel=1e-6)
    for a, b in zip(grown_sae.net.parameters(), scratch_sae.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_budget_dependent_schedule_trains_from_scratch(tmp_path, ray_local, capsys):
    results = tmp_path / "results"
    assert main(["run", _sweep(tmp_path, 6_000, lr_decay_frac=0.2), "--results", str(results)]) == 0
    capsys.readouterr()
    assert main(["run", _sweep(tmp_path, 18_000, lr_decay_frac=0.2), "--results", str(results)]) == 0
    assert "continues run" not in capsys.readouterr().out  # the decay's start moves with the budget: no prefix
