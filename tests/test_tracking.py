"""W&B (offline) and TensorBoard mirrors of the training curves: the same rows the Parquet curves hold."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestrator.plan import plan_runs, plan_sweep
from orchestrator.spec import parse_spec
from orchestrator.worker import train_pack
from sae_core.errors import ConfigError
from sae_core.sources.synthetic import SyntheticSource
from sae_core.tracking import Trackers, TrackersConfig
from sae_core.trainer import Trainer

SOURCE = SyntheticSource(d_in=16, n_features=64, n_eval=512, seed=0)


def test_trackers_see_every_curve_row_and_the_final_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(TrackersConfig(wandb={"mode": "offline", "project": "p"}, tensorboard=True), tmp_path,
                        "run1", "sweep", {"k": 4})
    trainer = Trainer({"arch": "topk", "d_in": 16, "n_latents": 64, "k": 4},
                      {"train_tokens": 256 * 10, "batch_size": 256, "init_samples": 512}, SOURCE)
    result = trainer.run(on_curve=trackers.log)
    trackers.finish(result.metrics)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "run1"))
    events.Reload()
    nmse = [(e.step, e.value) for e in events.Scalars("curve/nmse")]
    assert nmse == [(row["tokens"], pytest.approx(row["nmse"])) for row in result.curve]
    assert events.Scalars("final/nmse")[0].value == pytest.approx(result.metrics["nmse"])
    (log,) = tmp_path.glob("wandb/offline-run-*-run1/run-run1.wandb")  # one offline run, id = run_id
    # W&B's service process writes the file; on a loaded machine its records can land after finish() returns
    deadline = time.monotonic() + 30
    while b"dead_frac" not in (data := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"nmse" in data and b"mse_loss" in data and b"dead_frac" in data


def test_a_sweep_with_trackers_mirrors_each_run(tmp_path):
    spec = parse_spec({"name": "tr", "data": {"synthetic": {"d_in": 16, "n_features": 64}, "train_tokens": 2048,
                                               "eval_tokens": 512},
                       "grid": {"arch": ["topk"], "n_latents": [32, 64], "k": [4]},
                       "train": {"batch_size": 256, "init_samples": 256}, "trackers": {"tensorboard": True}})
    runs = plan_runs(spec, 16, [None])
    statuses = train_pack(spec.model_dump(mode="json", exclude_unset=True), [asdict(r) for r in runs], str(tmp_path))
    assert set(statuses.values()) == {"ok"}
    for run in runs:
        events = EventAccumulator(str(tmp_path / "tr" / "tensorboard" / run.run_id))
        events.Reload()
        assert events.Scalars("curve/nmse") and events.Scalars("final/nmse")


def test_a_tracker_whose_package_is_missing_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"trackers.wandb: the wandb package is not installed; pip install"):
        Trackers(TrackersConfig(wandb={}), tmp_path, "r", "s", {})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "data": {"synthetic": {}, "train_tokens": 10},
                                    "grid": {"arch": ["topk"], "n_latents": [8]}, "trackers": {"wandb": {}}}))
    with pytest.raises(ConfigError, match=f"{path}: trackers.wandb: the wandb package is not installed"):
        plan_sweep(path, tmp_path / "results")  # before anything runs or is written
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match=r"trackers.tensorbord: unknown key \(did you mean 'tensorboard'\?\); "
                                          "allowed: wandb, tensorboard"):
        parse_spec({"name": "x", "data": {"synthetic": {}, "train_tokens": 10}, "grid": {"arch": ["topk"],
                    "n_latents": [8]}, "trackers": {"tensorbord": True}})
