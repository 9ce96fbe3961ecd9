"""SAE families. Each module of this package defines one and registers it; all are imported here."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from sae_core.architectures.base import (
    Architecture,
    Code,
    LossOutput,
    SAEConfig,
    SparseCode,
    StepContext,
    registry,
)
from sae_core.errors import ConfigError, validate
from sae_core.parallel.mesh import TRIVIAL, Mesh

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def architecture_names() -> list[str]:
    return sorted(registry())


def parse_sae_config(data: dict[str, Any] | SAEConfig, source: str = "config", prefix: str = "") -> SAEConfig:
    """Validate a plain dict into the family's config class; errors name the key and what is allowed."""
    if isinstance(data, SAEConfig):
        return data
    arch = data.get("arch")
    families = registry()
    if arch not in families:
        key = ".".join(p for p in (prefix, "arch") if p)
        raise ConfigError(f"{source}: {key}: unknown architecture {arch!r}; allowed: {', '.join(sorted(families))}")
    config_cls = families[arch].Config
    foreign = sorted(set(data) - set(config_cls.model_fields))
    if foreign:
        key = ".".join(p for p in (prefix, foreign[0]) if p)
        raise ConfigError(f"{source}: {key}: does not apply to arch {arch!r}; its keys are: "
                          f"{', '.join(config_cls.model_fields)}")
    return validate(config_cls, data, source, prefix)


def build_architecture(cfg: SAEConfig, mesh: Mesh = TRIVIAL) -> Architecture:
    return registry()[cfg.arch](cfg, mesh)


__all__ = [
    "Architecture", "Code", "LossOutput", "SAEConfig", "SparseCode", "StepContext",
    "architecture_names", "build_architecture", "parse_sae_config",
]
