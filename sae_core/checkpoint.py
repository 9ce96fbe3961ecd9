"""Trainer checkpoints: weights, optimizer state, weight EMA, dead-latent counters and RNG state as one
safetensors file per latent shard, and a JSON manifest that commits them.

    <run>/trainer_state.json                                    manifest: scalar state, files, row ranges
    <run>/trainer_state/step-0000001200/shard-00000-of-00002.safetensors

Every shard writes its rows into the folder of the step; once all have, rank 0 replaces the manifest
(atomically) and removes older folders. A crash at any point leaves a manifest naming a complete set.
Replicas hold identical state, so replica 0 of each shard writes it. A single process is one shard.

Loading reads rows [start, stop) of every per-latent tensor from whichever files hold them, so a run
resumes under a different number of shards, and `consolidate` reads all rows: the whole SAE. A checkpoint
that cannot be read back (damaged storage, a file lost) raises UnreadableCheckpoint; the trainer then moves
it aside (`move_aside`) and starts the run from scratch rather than failing it on every retry.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from sae_core.errors import ConfigError, DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.parallel.mesh import TRIVIAL, Mesh

MANIFEST = "trainer_state.json"
SHARD_DIR = "trainer_state"
DEAD_KEY = "dead.tokens_since_fired"
BROKEN = ".broken"


class UnreadableCheckpoint(DataError):
    """The checkpoint's files cannot be read back into the model: truncated, garbage or missing."""

    def __init__(self, out_dir: Path, err: Exception):
        lines = str(err).strip().splitlines()  # load_state_dict's errors run over several lines
        self.path, self.reason = Path(out_dir) / MANIFEST, f"{type(err).__name__}: {lines[0] if lines else ''}"
        super().__init__(f"{self.path}: unreadable trainer checkpoint ({self.reason}); training the run again "
                         f"moves it aside ({BROKEN}) and starts from scratch")


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    mse_scale: float = 1.0
    input_rms: float = 1.0  # sqrt(E||x||^2) of the normalised init sample (StepContext.input_rms)
    fingerprint: str = ""
    loss_scale: float = 1.0  # fp16 autocast's dynamic loss scale, and the finite steps since it last changed
    loss_scale_good_steps: int = 0
    curve: list[dict] = field(default_factory=list)


def _latent_keys(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The tensors indexed by latent along dim 0: per-latent parameters, their Adam moments and EMA, the
    dead counters (an Adam step count is a scalar, the same on every shard)."""
    names = set(model.latent_parameters())
    return sorted(k for k, v in tensors.items()
                  if k == DEAD_KEY or (v.dim() >= 1 and k.split(".")[1] in names and k.split(".")[0] in
                                       ("model", "optim", "ema")))


def save_checkpoint(out_dir: Path, state: TrainerState, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    tokens_since_fired: torch.Tensor, ema: dict[str, torch.Tensor] | None,
                    sae_config: dict, mesh: Mesh = TRIVIAL) -> None:
    out_dir = Path(out_dir)
    step_dir = f"{SHARD_DIR}/step-{state.step:010d}"
    n = sae_config["n_latents"]
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for name, value in (ema or {}).items():
        tensors[f"ema.{name}"] = value
    tensors[DEAD_KEY] = tokens_since_fired
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    if mesh.writer:
        save_safetensors_atomic(tensors, out_dir / step_dir / _shard_file(mesh.shard, mesh.shards))
    mesh.barrier()
    if mesh.leader:
        write_json_atomic(out_dir / MANIFEST, {
            "state": asdict(state), "sae": sae_config, "latent_keys": _latent_keys(model, tensors),
            "shards": [{"file": f"{step_dir}/{_shard_file(s, mesh.shards)}", "rows": list(mesh.latent_range(n, s))}
                       for s in range(mesh.shards)]})
        for old in (out_dir / SHARD_DIR).glob("step-*"):
            if old.name < f"step-{state.step:010d}":  # later folders may be being written already
                shutil.rmtree(old, ignore_errors=True)


def _shard_file(shard: int, shards: int) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}.safetensors"


def has_checkpoint(out_dir: Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()


def _read(out_dir: Path, start: int, stop: float, device: torch.device | str, keys=None) -> tuple[dict, dict]:
    """The manifest and its tensors, per-latent ones restricted to rows [start, stop)."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        latent = set(manifest["latent_keys"])
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(Path(out_dir) / shards[0]["file"]), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in latent and (keys is None or key.split(".")[0] in keys):
                    tensors[key] = f.get_tensor(key)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in latent if keys is None or k.split(".")[0] in keys}
        for shard in shards:
            lo, hi = shard["rows"]
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            with safe_open(str(Path(out_dir) / shard["file"]), framework="pt", device=str(device)) as f:
                for key in parts:
                    parts[key].append(f.get_slice(key)[a - lo:b - lo])
        tensors.update({k: torch.cat(v) for k, v in parts.items()})
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise UnreadableCheckpoint(out_dir, err) from None
    return manifest, tensors


def move_aside(out_dir: Path) -> list[Path]:
    """Rename the manifest and the shard folder with a .broken suffix, so the run starts from scratch and the
    files stay for a post-mortem; returns the new paths."""
    moved = []
    for path in (Path(out_dir) / MANIFEST, Path(out_dir) / SHARD_DIR):
        if path.exists():
            dest = _free_name(path)
            os.replace(path, dest)
            moved.append(dest)
    return moved


def _free_name(path: Path) -> Path:
    """path.broken, else path.1.broken, path.2.broken, ...: an earlier broken checkpoint is kept too."""
    n, dest = 0, path.with_name(path.name + BROKEN)
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{n}{BROKEN}")
    return dest


def load_checkpoint(out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                    fingerprint: str) -> tuple[TrainerState, torch.Tensor, dict[str, torch.Tensor]]:
    """Restore this shard's model and optimizer in place; return the scalar state, dead counters and EMA.
    A checkpoint of another config (its fingerprint) is a ConfigError, raised before anything is loaded."""
    start = model.latent_start
    manifest, tensors = _read(out_dir, start, start + model.n_local, device)
    try:
        state = TrainerState(**manifest["state"])
    except (KeyError, TypeError) as err:
        raise UnreadableCheckpoint(out_dir, err) from None
    if state.fingerprint != fingerprint:
        raise ConfigError(f"{out_dir}: its checkpoint belongs to a different config; delete it or use another "
                          "out_dir")
    try:
        return (state, *_restore(tensors, model, opt))
    except (KeyError, RuntimeError, ValueError) as err:  # tensors missing or of other shapes: a foreign file
        raise UnreadableCheckpoint(out_dir, err) from None


def _restore(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
             opt: torch.optim.Optimizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {}
    for i, (name, _) in enumerate(model.named_parameters()):
        prefix = f"optim.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            opt_state[i] = entry
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return tensors[DEAD_KEY], ema


def consolidate(out_dir: Path, device: str | torch.device = "cpu"):
    """The SAE of a run's latest checkpoint, whole, in one process (however many shards wrote it)."""
    from sae_core.sae import SAE

    if not has_checkpoint(out_dir):
        raise DataError(f"{Path(out_dir) / MANIFEST}: not found; the run has written no checkpoint")
    manifest, tensors = _read(out_dir, 0, math.inf, device, keys={"model"})  # every shard's rows
    try:
        sae = SAE(manifest["sae"], init_seed=None)
        sae.net.load_state_dict({k[6:]: v for k, v in tensors.items()})
    except (KeyError, RuntimeError) as err:
        raise UnreadableCheckpoint(out_dir, err) from None
    return sae.to(device)


def adopt_checkpoint(src: Path, dst: Path, fingerprint: str) -> int:
    """Copy src's checkpoint into dst as the checkpoint of another config (its fingerprint): a run with a
    larger budget that continues where src stopped (the trainer's `continuable`). Returns the tokens it holds.
    The manifest is written last, so a crash leaves dst without a checkpoint, never with half of one."""
    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / MANIFEST).read_text())
    for shard in manifest["shards"]:
        target = dst / shard["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / shard["file"], target)
    manifest["state"] = {**manifest["state"], "fingerprint": fingerprint}
    write_json_atomic(dst / MANIFEST, manifest)
    return int(manifest["state"]["tokens"])

