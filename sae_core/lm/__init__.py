"""Transformer models as activation sources: loading (hub id, local folder, the embedded MiniLM) and hook points."""
from sae_core.lm.hooks import SITES, ActivationExtractor
from sae_core.lm.loading import EMBEDDED_MODEL, LoadedModel, load_model

__all__ = ["SITES", "ActivationExtractor", "EMBEDDED_MODEL", "LoadedModel", "load_model"]
