"""Where training activations come from: synthetic ones with a known dictionary, or pre-computed files."""
from sae_core.sources.base import ActivationSource
from sae_core.sources.files import FileSource
from sae_core.sources.synthetic import SyntheticSource, mmcs

__all__ = ["ActivationSource", "FileSource", "SyntheticSource", "mmcs"]
