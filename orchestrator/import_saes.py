"""SAEs trained elsewhere (SAELens, sparsify, or ours) evaluated on a sweep's data and written into its
results as rows like the sweep's own: `sae-scaling import SWEEP FOLDER...`. They then appear in `results`,
the family comparison, `fit` (L(N), never L(C): their training compute is unknown, so tokens and flops are
empty) and every figure drawn from rows (frontier, nmse vs n, downstream, recovery), next to the sweep's runs.

Each is evaluated exactly as a finished run (orchestrator/record.py): held-out nmse, L0, dead fraction,
downstream loss by splicing (when the sweep has a model and the SAE reads its hook) and progressive recovery.
Its run_id is a hash of its weights, so importing a folder twice rewrites one row.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from orchestrator.plan import plan_sweep
from orchestrator.record import EvalInputs, Identity, Outcome, now_utc, record, splicer_of
from sae_core.errors import DataError
from sae_core.evaluation.reconstruction import evaluate
from sae_core.sae import SAE

# the training settings of an SAE trained elsewhere: unknown, null in its row and its config_json
NOT_TRAINED_HERE = {"seed": None, "batch_size": None, "train_tokens": None}


def _weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _model_of(sweep, folder: Path, sae: SAE):
    """The single-model sweep and data an SAE is evaluated on: a sweep of several models takes the one the
    SAE was trained on (its hook's model), by name."""
    if len(sweep.models) == 1:
        return next(iter(sweep.models.values()))
    trained = (sae.meta.get("hook") or {}).get("model")
    if trained not in sweep.models:
        raise DataError(f"{folder}: the SAE was trained on model {trained or '(not recorded)'}; the sweep lists "
                        f"several models, allowed: {', '.join(map(str, sweep.models))}")
    return sweep.models[trained]


def import_saes(sweep_path: str | Path, folders: list[str | Path], results: str | Path = "results",
                echo: Callable[[str], None] = print) -> list[str]:
    """Evaluate each SAE folder on the sweep's data and write its row; returns the run_ids."""
    sweep = plan_sweep(sweep_path, results)
    store = sweep.store
    saes = []
    for folder in map(Path, folders):  # every folder checked before any is evaluated
        sae = SAE.load(folder)
        spec, data = _model_of(sweep, folder, sae)
        if sae.cfg.d_in != data.d_in:
            raise DataError(f"{folder}: the SAE reads {sae.cfg.d_in}-dimensional vectors, the sweep's data are "
                            f"{data.d_in}-dimensional; allowed: SAEs of d_in {data.d_in}")
        hook_layers = ((sae.meta.get("hook") or {}).get("layers") or [None])
        layers = data.run_layers()
        layer = hook_layers[0] if hook_layers[0] in layers else layers[0]
        if spec.data.has_model and hook_layers[0] is not None and hook_layers[0] not in layers:
            raise DataError(f"{folder}: the SAE reads layer {hook_layers[0]}; the sweep hooks layers "
                            f"{', '.join(map(str, layers))}")
        saes.append((folder, sae, layer, spec, data))
    splicers = {}  # one per model: it holds the model and its held-out rows
    for spec, data in {id(d): (s, d) for *_, s, d in saes}.values():
        data.prepare(echo)
        data.check_finite(echo)
        splicers[id(data)] = splicer_of(spec, data)
    if not (store.dir / "sweep.yaml").is_file():  # importing into a sweep not run yet
        store.save_spec(sweep.text)
    run_ids = []
    for folder, sae, layer, spec, data in saes:
        source = (sae.meta.get("imported_from") or {}).get("format", "sae-scaling")
        identity = Identity(f"import-{_weights_hash(folder)}", sae.cfg.arch, layer,
                            axes={"arch": sae.cfg.arch, "n_latents": sae.cfg.n_latents, "imported": source},
                            sae={**sae.cfg.model_dump(), "imported_from": str(folder)}, train=NOT_TRAINED_HERE)
        started = now_utc()
        inputs = EvalInputs.of(spec, data, data.source(layer, seed=spec.data_seed), layer, splicers[id(data)])
        metrics = evaluate(sae, inputs.eval_x, layer_ids=inputs.layer_ids).metrics  # per layer if multi-layer
        # its weights are those given: no EMA weights swapped in
        outcome = Outcome("ok", metrics, device=str(sae.net.W_dec.device), ema_used=False)
        record(spec, store, identity, sae, inputs, outcome, started, data.layers)
        echo(f"{folder} ({source} {sae.cfg.arch}, n {sae.cfg.n_latents}): {identity.run_id}, "
             f"nmse {metrics['nmse']:.4g}, l0 {metrics['l0']:.3g}")
        run_ids.append(identity.run_id)
    return run_ids
