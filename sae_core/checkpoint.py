"""Trainer checkpoints: one safetensors file holding weights, optimizer state, weight EMA, dead-latent
counters and RNG state, with the scalar state (step, tokens, curve so far) as JSON metadata.
One file, written atomically, so a crash leaves either the previous checkpoint or the new one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic

STATE_FILE = "trainer_state.safetensors"


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    mse_scale: float = 1.0
    fingerprint: str = ""
    curve: list[dict] = field(default_factory=list)


def save_checkpoint(path: Path, state: TrainerState, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    tokens_since_fired: torch.Tensor, ema: dict[str, torch.Tensor] | None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for name, value in (ema or {}).items():
        tensors[f"ema.{name}"] = value
    tensors["dead.tokens_since_fired"] = tokens_since_fired
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_safetensors_atomic(tensors, path, metadata={"state": json.dumps(asdict(state))})


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device) -> tuple[TrainerState, torch.Tensor, dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; return the scalar state, dead counters and EMA tensors."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = TrainerState(**json.loads(f.metadata()["state"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise DataError(f"{path}: unreadable trainer checkpoint ({err}); delete it to restart the run") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    names = [name for name, _ in model.named_parameters()]
    opt_state = {}
    for i, name in enumerate(names):
        prefix = f"optim.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            opt_state[i] = entry
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return state, tensors["dead.tokens_since_fired"], ema
