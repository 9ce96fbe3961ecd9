"""SAEs trained elsewhere (SAELens, sparsify, or ours) evaluated on a sweep's data and written into its
results as rows like the sweep's own: `sae-scaling import SWEEP FOLDER...`. They then appear in `results`,
the family comparison, `fit` (L(N), never L(C): their training compute is unknown, so tokens and flops are
empty) and every figure drawn from rows (frontier, nmse vs n, downstream, recovery), next to the sweep's runs.

Each is evaluated exactly as a finished run: held-out nmse, L0, dead fraction, downstream loss by splicing
(when the sweep has a model and the SAE reads its hook) and progressive recovery. Its run_id is a hash of its
weights, so importing a folder twice rewrites one row.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from orchestrator.plan import RunPlan
from orchestrator.scheduler import plan_sweep
from orchestrator.worker import SharedStream, ActiveRun, finish_run, splicer_of, now_utc
from sae_core.errors import DataError
from sae_core.evaluation.reconstruction import evaluate
from sae_core.sae import SAE
from sae_core.trainer import RunResult


def _weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def import_saes(sweep_path: str | Path, folders: list[str | Path], results: str | Path = "results",
                echo: Callable[[str], None] = print) -> list[str]:
    """Evaluate each SAE folder on the sweep's data and write its row; returns the run_ids."""
    sweep = plan_sweep(sweep_path, results)
    spec, store, data = sweep.spec, sweep.store, sweep.data
    saes = []
    for folder in map(Path, folders):  # every folder checked before any is evaluated
        sae = SAE.load(folder)
        if sae.cfg.d_in != data.d_in:
            raise DataError(f"{folder}: the SAE reads {sae.cfg.d_in}-dimensional vectors, the sweep's data are "
                            f"{data.d_in}-dimensional; allowed: SAEs of d_in {data.d_in}")
        hook_layers = ((sae.meta.get("hook") or {}).get("layers") or [None])
        layers = data.run_layers()
        layer = hook_layers[0] if hook_layers[0] in layers else layers[0]
        if spec.data.has_model and hook_layers[0] is not None and hook_layers[0] not in layers:
            raise DataError(f"{folder}: the SAE reads layer {hook_layers[0]}; the sweep hooks layers "
                            f"{', '.join(map(str, layers))}")
        saes.append((folder, sae, layer))
    data.prepare(echo)
    data.check_finite(echo)
    if not (store.dir / "sweep.yaml").is_file():  # importing into a sweep not run yet
        store.save_spec(sweep.text)
    splicer = splicer_of(spec, data)
    run_ids = []
    for folder, sae, layer in saes:
        source = (sae.meta.get("imported_from") or {}).get("format", "sae-scaling")
        cfg = sae.cfg.model_dump()
        plan = RunPlan(run_id=f"import-{_weights_hash(folder)}", arch=sae.cfg.arch, layer=layer,
                       axes={"arch": sae.cfg.arch, "n_latents": sae.cfg.n_latents, "imported": source},
                       sae={**cfg, "imported_from": str(folder)},
                       train={"seed": None, "batch_size": None, "train_tokens": None}, stream="")
        stream = SharedStream(data.source(layer, seed=spec.data_seed))
        started = now_utc()
        ev = evaluate(sae, stream.eval_set(), layer_ids=stream.eval_layer_ids())  # per layer if multi-layer
        result = RunResult(status="ok", error=None, metrics=ev.metrics, curve=[], steps=None, tokens=None,
                           flops=None, lr=None, wall_seconds=None, device=str(sae.net.W_dec.device), sae=sae)
        finish_run(spec, data, stream, ActiveRun(plan, None, None, started), result, None, store, layer, splicer)
        echo(f"{folder} ({source} {sae.cfg.arch}, n {sae.cfg.n_latents}): {plan.run_id}, "
             f"nmse {ev.metrics['nmse']:.4g}, l0 {ev.metrics['l0']:.3g}")
        run_ids.append(plan.run_id)
    return run_ids
