"""Peer toolkits' on-disk SAE formats: ours exported to them, theirs read as ours (`SAE.load` detects which
a folder holds), so the field's tools load what is trained here and this toolkit's evaluations, family
comparison and figures run on SAEs trained elsewhere. Each module is one format: `matches`, `load`, `export`.
"""
from __future__ import annotations

from pathlib import Path

from sae_core.errors import DataError
from sae_core.formats import saelens, sparsify

FORMATS = {"saelens": saelens, "sparsify": sparsify}


def load_foreign(path: Path, device: str = "cpu"):
    """The SAE in a peer's folder as ours; None if the folder holds none of the peers' formats."""
    for module in FORMATS.values():
        if module.matches(path):
            return module.load(path).to(device)
    return None


def export(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """A finished run's SAE in a peer's format under `out`."""
    from sae_core.sae import CONFIG_FILE, WEIGHTS_FILE, SAE

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
    sae = SAE.load(run_dir)  # its errors name the broken file, inside run_dir
    try:
        return FORMATS[fmt].export(sae, Path(out), run_dir)
    except DataError as err:
        raise DataError(f"{run_dir}: {err}") from None
