"""The shared trainer core: architectures, sparse kernels, trainer, activation sources, metrics, storage."""
from sae_core.architectures import SAEConfig, architecture_names, parse_sae_config
from sae_core.config import TrainConfig, parse_train_config
from sae_core.errors import ConfigError, DataError, SAEScalingError
from sae_core.sae import SAE
from sae_core.trainer import RunResult, Trainer

__all__ = [
    "SAE", "SAEConfig", "TrainConfig", "Trainer", "RunResult", "ConfigError", "DataError", "SAEScalingError",
    "architecture_names", "parse_sae_config", "parse_train_config",
]
