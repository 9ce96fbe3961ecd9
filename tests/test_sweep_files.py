"""Every shipped sweep validates and plans (the model-backed ones with their model's width, offline)."""
from pathlib import Path

import pytest

from orchestrator.plan import plan_runs
from orchestrator.spec import load_spec

SWEEPS = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
WIDTH = {"gpt2": 768, "EleutherAI/pythia-70m-deduped": 512, "embedded": 384}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweep_validates_and_plans(path):
    spec = load_spec(path)
    layers = [None] if spec.hook.multi_layer else spec.hook.layers
    runs = plan_runs(spec, WIDTH[spec.model], layers, source=str(path))
    assert runs and len({r.run_id for r in runs}) == len(runs)
    if not path.stem.startswith("quickstart"):
        assert path.read_text().startswith("# "), "a reproduction sweep names its paper in a header comment"
