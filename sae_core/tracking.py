"""Training curves mirrored to the trackers researchers watch: Weights & Biases (online, or offline for a
later `wandb sync`) and TensorBoard. The Parquet curves stay the source of truth; a tracker sees the same
rows, as they are written, and the run's final metrics. Both are optional (`pip install sae-scaling[trackers]`)
and switched on in the sweep:

    trackers: {wandb: {project: sae-scaling, mode: offline}, tensorboard: true}
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sae_core.errors import ConfigError


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = "sae-scaling"  # the W&B project
    entity: str | None = None  # the W&B team or user; None: the logged-in user's default
    mode: Literal["online", "offline"] = "offline"  # offline: logs under the sweep folder, `wandb sync` later


class TrackersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wandb: WandbConfig | None = None  # mirror each run's curve and final row to Weights & Biases
    tensorboard: bool = False  # write TensorBoard scalars under <results>/<sweep>/tensorboard/<run_id>/

    @property
    def any(self) -> bool:
        return self.wandb is not None or self.tensorboard


def _require(module: str, key: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"trackers.{key}: the {module.split('.')[0]} package is not installed; "
                          "pip install 'sae-scaling[trackers]' or remove the key") from None


def check_installed(cfg: TrackersConfig) -> None:
    """Refuse a sweep asking for a tracker whose package is missing, before anything runs."""
    if cfg.tensorboard:
        _require("torch.utils.tensorboard", "tensorboard")
    if cfg.wandb is not None:
        _require("wandb", "wandb")


class Trackers:
    """The trackers of one run: `log(row)` for each curve row, `finish(metrics)` once."""

    def __init__(self, cfg: TrackersConfig, root: Path, run_id: str, group: str, config: dict):
        if cfg.tensorboard:
            tensorboard = _require("torch.utils.tensorboard", "tensorboard")
            self._tb = tensorboard.SummaryWriter(log_dir=str(root / "tensorboard" / run_id))
        else:
            self._tb = None
        self._wandb = None
        if cfg.wandb is not None:
            wandb = _require("wandb", "wandb")
            root.mkdir(parents=True, exist_ok=True)  # W&B writes under root/wandb
            # id = run_id with resume: a retried or resumed run continues its own W&B run
            self._wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                                     dir=str(root), id=run_id, name=run_id, group=group, config=config,
                                     resume="allow", reinit="create_new")

    def log(self, row: dict) -> None:
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"curve/{key}", value, global_step=int(row["tokens"]))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(row["step"]))

    def finish(self, metrics: dict) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"final/{key}", value)
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update(scalars)
            self._wandb.finish()
