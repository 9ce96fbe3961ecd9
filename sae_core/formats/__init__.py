"""Peer toolkits' on-disk SAE formats: ours exported to them, theirs read as ours (`SAE.load` reads any folder
through `read`), so the field's tools load what is trained here and this toolkit's evaluations, family
comparison and figures run on SAEs trained elsewhere. Each module is one format: `matches` (does a folder
hold it), `read` (a folder to SAEContents in our names), `write` (an SAE's config, tensors and metadata to
a folder). Formats deal in contents, never in SAE objects: sae_core.sae builds those and imports this.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from sae_core.architectures import build_architecture
from sae_core.errors import DataError
from sae_core.formats import saelens, sparsify
from sae_core.sae_files import CONFIG_FILE, LATENT_STATS_FILE, WEIGHTS_FILE, SAEContents, load_state, read_folder

FORMATS = {"saelens": saelens, "sparsify": sparsify}


def detect(path: Path) -> ModuleType | None:
    """The peer format a folder holds; None if none."""
    return next((module for module in FORMATS.values() if module.matches(path)), None)


def read(path: Path) -> SAEContents:
    """The SAE in a folder of ours or a peer's."""
    if (path / CONFIG_FILE).is_file():
        return read_folder(path)
    peer = detect(path) if path.is_dir() else None
    if peer is None:
        raise DataError(f"{path}: no SAE here; expected this toolkit's folder ({CONFIG_FILE} + {WEIGHTS_FILE}), "
                        "a SAELens v6 folder (cfg.json + sae_weights.safetensors) or a sparsify folder "
                        "(cfg.json + sae.safetensors)")
    return peer.read(path)


def export(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """A finished run's SAE in a peer's format under `out`."""
    if fmt not in FORMATS:
        raise DataError(f"export --format: {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run folder; expected results/<sweep>/saes/<run_id> or a folder "
                        f"SAE.save wrote")
    if not (run_dir / WEIGHTS_FILE).is_file():
        why = ("the run has not finished (only its checkpoint is there)" if (run_dir / "trainer_state.json").is_file()
               else "no SAE here")
        raise DataError(f"{run_dir}: {why}; export needs {WEIGHTS_FILE} and {CONFIG_FILE}, which a run writes when "
                        "it ends ok")
    contents = read(run_dir)  # its errors name the broken file, inside run_dir
    net = build_architecture(contents.config)  # the tensors checked against their config, as SAE.load does
    load_state(net, contents)
    try:
        return FORMATS[fmt].write(contents.config, net.state_dict(), contents.meta, Path(out),
                                  run_dir / LATENT_STATS_FILE)
    except DataError as err:
        raise DataError(f"{run_dir}: {err}") from None
