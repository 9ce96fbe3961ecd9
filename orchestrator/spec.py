"""The sweep YAML: typed, validated before anything runs, every error naming the file and the key.

    name: gpt2-l8-topk
    model: gpt2
    hook: {site: resid_post_ln, layers: [8]}
    data: {text: {...}, context_length: 64, train_tokens: 50_000_000, eval_tokens: 1_000_000}
    grid: {arch: [topk, relu], n_latents: [4096, 16384], k: [16, 32], l1_coeff: [1e-3], lr: [auto], seed: [0]}
    zip: [[n_latents, lr]]          # axes varied together instead of crossed
    sae: {normalization: unit_norm} # SAE keys for every architecture that takes them
    train: {batch_size: 4096}       # every trainer switch (sae_core.config.TrainConfig)
    overrides: {relu: {lr: 5e-5}}   # per-architecture SAE or train keys; a list: that architecture's own axis
    eval: {downstream_tokens: 65536}
    trackers: {wandb: {project: my-project, mode: offline}, tensorboard: true}
    resources: {gpus: auto, cpus: 1}  # shards: 8, replicas: 2 train each run on 16 processes
    retries: 2
    pack_size: 8
    cache_root: /shared/cache       # where activation caches live (every node must see it)

The grid is the product of its axes (a `zip` group counting as one axis); an axis applies only to the
architectures whose config has that key (k to the TopK family, l1_coeff to the L1 family), so one grid mixes
architectures; `n_latents` or `expansion_factor` (n = R * d_in) sizes the SAE; the hook's layers are one
more axis (one SAE per layer) unless hook.multi_layer.

`overrides.<arch>.<key>`: a scalar is that architecture's value (the grid's axis collapses to it); a list is
that architecture's own axis, replacing the grid's axis of that key for it alone (or adding one), so each
family can sweep its own grid (Gao et al. 2024, App. B.2: a different lambda and lr grid per baseline).
`train_tokens` may be overridden too: the vectors that architecture's runs see, data.train_tokens being the
pool they cycle through (in reshuffled epochs when the budget is larger) and the default budget.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.search import SearchConfig
from sae_core.activation_data import SYNTHETIC_KEYS, DataConfig, HookConfig
from sae_core.architectures import architecture_names
from sae_core.architectures.base import registry
from sae_core.config import TrainConfig
from sae_core.errors import ConfigError, DataError, format_error_entry, merge_union_errors
from sae_core.evaluation.run import EvalConfig
from sae_core.sources.files import expand_paths
from sae_core.tracking import TrackersConfig

SPECIAL_AXES = ("arch", "n_latents", "expansion_factor", "lr", "seed")
_NOT_IN_TRAIN = {"train_tokens", "lr", "seed"}  # set by data.train_tokens and the grid
_OVERRIDE_ONLY = {"lr", "seed", "n_latents", "expansion_factor", "train_tokens"}  # besides SAE and train keys
_NOT_IN_SAE = {"arch", "d_in", "n_latents"}


def sae_keys(arch: str) -> set[str]:
    return set(registry()[arch].Config.model_fields) - _NOT_IN_SAE


def train_keys() -> set[str]:
    return set(TrainConfig.model_fields) - _NOT_IN_TRAIN


def all_axis_keys() -> list[str]:
    return sorted(set(SPECIAL_AXES) | train_keys() | set().union(*(sae_keys(a) for a in architecture_names())))


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # per run, split evenly over its shards x replicas processes; auto: 1 per process where the cluster has
    # GPUs, else CPU-only; a fraction < 1 packs several single-process runs on one GPU
    gpus: float | Literal["auto"] = "auto"
    cpus: float = Field(1, gt=0)  # per process; also caps torch's threads in it
    memory_gb: float | None = Field(None, gt=0)  # Ray `memory` per process
    custom: dict[str, float] = {}  # custom Ray resources per process, e.g. {sae_worker: 1} to pick nodes
    shards: int | None = Field(None, ge=1)  # latent shards per run; None: gpus / replicas when gpus > 1, else 1
    replicas: int = Field(1, ge=1)  # data-parallel replicas per run

    @property
    def layout(self) -> tuple[int, int]:
        """(shards, replicas): a run asking for G > 1 GPUs is sharded G / replicas ways unless told otherwise."""
        if self.shards is not None:
            return self.shards, self.replicas
        gpus = 0 if self.gpus == "auto" else self.gpus
        return max(1, int(gpus) // self.replicas), self.replicas

    @model_validator(mode="after")
    def _gpus_split_evenly(self):
        shards, replicas = self.layout
        world = shards * replicas
        if self.gpus != "auto" and world > 1 and self.gpus and (self.gpus % world or self.gpus < world):
            raise ValueError(f"resources.gpus: {self.gpus:g} GPUs cannot be split evenly over shards x replicas = "
                             f"{shards} x {replicas} = {world} processes; allowed: 0, auto or a multiple of {world}")
        if self.gpus != "auto" and self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"resources.gpus: {self.gpus:g}; allowed: a fraction <= 1 or a whole number")
        return self

    def per_process_gpus(self, cluster_has_gpus: bool) -> float:
        if self.gpus == "auto":
            return 1.0 if cluster_has_gpus else 0.0
        shards, replicas = self.layout
        return float(self.gpus) / (shards * replicas)


class SubjectModel(BaseModel):
    """One entry of a `model` list: the model and, where its depth differs from the others', its own hook."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # hub id, local folder or `embedded`
    hook: HookConfig | None = None  # this model's hook (site, layers); None: the sweep's `hook`


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # the folder under the results root
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    # hub id (read from the local hub cache), local folder, or `embedded` (MiniLM). A list is a grid axis, one
    # activation stream per model, each entry a name or {name, hook} (Gao et al. 2024, §3.5: L(N) per subject
    # model size)
    model: str | list[SubjectModel] | None = None
    hook: HookConfig = HookConfig()  # where in the model the activations are read
    data: DataConfig  # text, activation files or synthetic vectors; token budgets
    grid: dict[str, list[Any]]  # axes (lists of values) whose product is the sweep; axes listed below
    zip: list[list[str]] = []  # groups of axes varied together instead of crossed, e.g. [[n_latents, lr]]
    sae: dict[str, Any] = {}  # SAE keys for every architecture that takes them (sections `sae` below)
    train: dict[str, Any] = {}  # trainer keys for every run (section `train`)
    # per architecture: SAE, trainer, lr, seed, size or train_tokens keys; a list is that architecture's own axis
    overrides: dict[str, dict[str, Any]] = {}
    eval: EvalConfig = EvalConfig()  # held-out evaluation settings
    trackers: TrackersConfig = TrackersConfig()  # W&B / TensorBoard mirrors of the curves (sae_core/tracking.py)
    resources: Resources = Resources()  # Ray resources per training process
    # successive halving over one axis (normally lr) per grid cell, instead of training every value to the
    # end (orchestrator/search.py); stopped runs keep their rows, curves and checkpoints
    search: SearchConfig | None = None
    retries: int = Field(2, ge=0)  # re-runs of a pack whose worker or node died (from its checkpoints)
    pack_size: int = Field(8, ge=1)  # runs sharing one activation stream trained together by one worker
    data_seed: int = Field(0, ge=0)  # order of the training vectors, shared by every run
    # activation and token caches; None: $SAE_SCALING_CACHE or ~/.cache/sae-scaling. On a multi-node cluster,
    # storage every node can read (the driver builds the cache, the workers read it).
    cache_root: str | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_entries(cls, model):
        """A list's entries as SubjectModels (a bare name is {name}), each error naming its entry and key."""
        if not isinstance(model, list):
            return model
        out = []
        for i, entry in enumerate(model):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict):
                raise ValueError(f"entry {i}: {entry!r} is neither a model name nor a mapping {{name, hook}}")
            allowed = list(SubjectModel.model_fields)
            extra = sorted(set(entry) - set(allowed))
            if extra:
                raise ValueError(f"entry {i}: unknown key {extra[0]!r}{_did_you_mean(extra[0], allowed)}; allowed: "
                                 f"{', '.join(allowed)}")
            try:
                out.append(SubjectModel.model_validate(entry))
            except ValidationError as err:
                raise ValueError("; ".join(format_error_entry(e, f"entry {i}") for e in err.errors())) from None
        return out

    @field_validator("grid", mode="before")
    @classmethod
    def _axes_are_lists(cls, grid):
        if isinstance(grid, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        return grid

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, grid):
        known = all_axis_keys()
        for key, values in grid.items():
            if key not in known:
                raise ValueError(f"unknown axis {key!r}{_did_you_mean(key, known)}; allowed: {', '.join(known)}")
            if not values:
                raise ValueError(f"axis {key!r} is empty; give at least one value")
        if "arch" not in grid:
            raise ValueError(f"needs an `arch` axis; allowed architectures: {', '.join(architecture_names())}")
        bad = [a for a in grid["arch"] if a not in architecture_names()]
        if bad:
            raise ValueError(f"arch: unknown architecture {bad[0]!r}{_did_you_mean(str(bad[0]), architecture_names())};"
                             f" allowed: {', '.join(architecture_names())}")
        if ("n_latents" in grid) == ("expansion_factor" in grid):
            raise ValueError("give exactly one of the axes n_latents and expansion_factor")
        return grid

    @model_validator(mode="after")
    def _consistent(self):
        archs = self.grid["arch"]
        for key in self.grid:
            if key not in SPECIAL_AXES and key not in train_keys() and not any(key in sae_keys(a) for a in archs):
                takers = [a for a in architecture_names() if key in sae_keys(a)]
                raise ValueError(f"grid.{key}: applies to none of the grid's architectures ({', '.join(archs)}); "
                                 f"it applies to: {', '.join(takers)}")
        seen: set[str] = set()
        for group in self.zip:
            for key in group:
                if key not in self.grid:
                    raise ValueError(f"zip: {key!r} is not an axis of the grid; axes: {', '.join(self.grid)}")
                if key in seen:
                    raise ValueError(f"zip: {key!r} appears in two groups")
                seen.add(key)
            lengths = {len(self.grid[k]) for k in group}
            if len(lengths) > 1:
                raise ValueError(f"zip: the axes {', '.join(group)} must have equal lengths (got "
                                 f"{', '.join(str(len(self.grid[k])) for k in group)})")
        for key in self.sae:
            if key in _NOT_IN_SAE or not any(key in sae_keys(a) for a in archs):
                raise ValueError(f"sae.{key}: not a key of the grid's architectures; allowed: "
                                 f"{', '.join(sorted(set().union(*(sae_keys(a) for a in archs))))}")
        for key in self.train:
            if key not in train_keys():
                hint = (" (set by data.train_tokens; per architecture: overrides.<arch>.train_tokens)"
                        if key == "train_tokens" else " (a grid axis)" if key in _NOT_IN_TRAIN
                        else _did_you_mean(key, sorted(train_keys())))
                raise ValueError(f"train.{key}: not a trainer key{hint}; allowed: {', '.join(sorted(train_keys()))}")
        zip_group = {k: group for group in self.zip for k in group}
        for arch, keys in self.overrides.items():
            if arch not in archs:
                raise ValueError(f"overrides.{arch}: not an architecture of the grid; allowed: {', '.join(archs)}")
            allowed = sae_keys(arch) | train_keys() | _OVERRIDE_ONLY
            for key, value in keys.items():
                if key not in allowed:
                    raise ValueError(f"overrides.{arch}.{key}: does not apply to {arch}"
                                     f"{_did_you_mean(key, sorted(allowed))}; allowed: {', '.join(sorted(allowed))}")
                if not isinstance(value, list):
                    continue
                if not value:
                    raise ValueError(f"overrides.{arch}.{key}: an empty list; a list is {arch}'s own {key} axis, "
                                     f"give at least one value (or a scalar)")
                if key in zip_group:
                    group = zip_group[key]
                    raise ValueError(f"overrides.{arch}.{key}: a list makes {key} {arch}'s own axis, but {key} is "
                                     f"zipped with {', '.join(k for k in group if k != key)} (zip: "
                                     f"[{', '.join(group)}]); allowed: a scalar override of {key}, or {key} out of "
                                     f"the zip group")
        if self.search is not None:
            axis = self.search.axis
            own = {len(v) for o in self.overrides.values() for k, v in o.items() if k == axis and isinstance(v, list)}
            if len(self.grid.get(axis, [])) < 2 and not own - {1}:
                raise ValueError(f"search.axis: {axis!r} needs at least 2 values in the grid (or an override's list) "
                                 f"to search over; grid axes: {', '.join(self.grid)}")
            if any(axis in group for group in self.zip):
                raise ValueError(f"search.axis: {axis!r} is zipped with other axes; a searched axis varies alone "
                                 "within each cell (take it out of the zip group)")
        for key in self.data.synthetic or {}:
            if key not in SYNTHETIC_KEYS:
                hint = " (set by data.eval_tokens)" if key == "n_eval" else _did_you_mean(key, SYNTHETIC_KEYS)
                raise ValueError(f"data.synthetic.{key}: unknown key{hint}; allowed: {', '.join(SYNTHETIC_KEYS)}")
        if isinstance(self.model, list):
            names = [m.name for m in self.model]
            if not names:
                raise ValueError("model: an empty list; give a model name, or a list of at least one")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"model: {', '.join(twice)} listed twice; each model once")
        if self.data.has_model and not self.model:
            raise ValueError("model: required with data.text (a hub id, a local folder, or `embedded`)")
        if not self.data.has_model and self.model:
            raise ValueError("model: give it with data.text only; data.activations / data.synthetic bring the "
                             "vectors themselves")
        return self


    def per_model(self) -> list[SweepSpec]:
        """One single-model sweep per entry of a `model` list, each with its own hook (itself when `model` is
        not a list): everything below the sweep file (planning, workers, records) sees one model at a time."""
        if not isinstance(self.model, list):
            return [self]
        return [self.model_copy(update={"model": m.name, "hook": m.hook or self.hook}) for m in self.model]


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_spec(data: Any, source: str = "sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the sweep must be a mapping of keys (name, model, hook, data, grid, ...)")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


def _explain(err, source: str) -> str:
    """One line per problem; unknown keys get the allowed keys of their section and a did-you-mean."""
    lines = []
    errors = merge_union_errors(err.errors())
    # a misspelt required key (data.train_token) is reported as unknown with its did-you-mean, not also as missing
    meant = set()
    for e in errors:
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _section_keys([str(p) for p in e["loc"][:-1]]), n=1)
            meant |= {(*e["loc"][:-1], c) for c in close}
    for e in errors:
        if e["type"] == "extra_forbidden":
            loc = [str(p) for p in e["loc"]]
            allowed = _section_keys(loc[:-1])
            key = ".".join(loc)
            lines.append(f"{source}: {key}: unknown key{_did_you_mean(loc[-1], allowed)}; allowed: "
                         f"{', '.join(allowed)}")
        elif not (e["type"] == "missing" and tuple(e["loc"]) in meant):
            lines.append(format_error_entry(e, source))
    return "\n".join(lines)


def _section_keys(path: list[str]) -> list[str]:
    model: Any = SweepSpec
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    spec = parse_spec(data, str(path))
    if spec.data.activations is not None:  # the cheap check here, so the message names the sweep file and key
        try:
            expand_paths(spec.data.activations)
        except DataError as err:
            raise DataError(f"{path}: data.activations: {err}") from None
    return spec


def json_schema() -> str:
    """The JSON Schema of the sweep YAML, for editors (yaml-language-server: $schema=...)."""
    return json.dumps(SweepSpec.model_json_schema(), indent=1)
