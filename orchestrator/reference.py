"""The sweep YAML reference (docs/sweep-reference.md), generated from the typed config models so it cannot drift
from them: every key, its type, its default and its description. A field's description is its pydantic
`description`, else the comment written beside it or above it in the model's source (the code's own
documentation of the field). `make docs` rewrites the page; a test fails when it is stale.

    .venv/bin/python -m orchestrator.reference > docs/sweep-reference.md
"""
from __future__ import annotations

import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.search import SearchConfig
from orchestrator.spec import _NOT_IN_SAE, _NOT_IN_TRAIN, SPECIAL_AXES, Resources, SubjectModel, SweepSpec
from sae_core.activation_data import DataConfig, HookConfig
from sae_core.architectures import architecture_names
from sae_core.architectures.base import SAEConfig, registry
from sae_core.config import TrainConfig
from sae_core.evaluation.probe_datasets import ProbeTaskSpec
from sae_core.evaluation.run import EvalConfig
from sae_core.text.documents import TextSpec
from sae_core.tracking import TrackersConfig, WandbConfig


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside its declaration (or on the lines just above it) in cls's own source."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
               if tok.type == tokenize.COMMENT}
    out = {}
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if not (line.startswith("    ") and not line.startswith("     ") and ":" in stripped
                and name.isidentifier() and not stripped.startswith(("def ", "class ", "@", "#", "return"))):
            continue
        above, j = [], i - 1
        while j in by_line and lines[j - 1].strip().startswith("#"):
            above.insert(0, by_line[j])
            j -= 1
        text = " ".join(above + ([by_line[i]] if i in by_line else []))
        if text:
            out[name] = text
    return out


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Each field's description: its pydantic description, else its source comment (a subclass's wins)."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            docs.update(_comments(cls))
    docs.update({name: f.description for name, f in model.model_fields.items() if f.description})
    return docs


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # constrained types (PositiveInt): the constraint is in the description
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args if a is not type(None)) + (
            " \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(below)"
    return f"`{value!r}`" if value not in (None, {}, []) else ("`null`" if value is None else f"`{value!r}`")


def _table(model: type[BaseModel], prefix: str, skip: set[str] = frozenset()) -> list[str]:
    docs = field_docs(model)
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name not in skip:
            what = docs.get(name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {what} |")
    return rows


def reference() -> str:
    """The whole page, in markdown."""
    out = ["# Sweep YAML reference", "",
           "Generated from the config models by `make docs` (orchestrator/reference.py); do not edit by hand. "
           "A key's description is the one its model gives. How the keys work together: "
           "[Running sweeps](sweeps.md). Part of the [sae-scaling manual](README.md).", ""]
    sections = [("Top level", SweepSpec, "", {"hook", "data", "eval", "trackers", "resources", "search"}),
                ("model (entries of a list)", SubjectModel, "model[].", set()),
                ("hook", HookConfig, "hook.", set()), ("data", DataConfig, "data.", {"text"}),
                ("data.text", TextSpec, "data.text.", set()),
                ("train", TrainConfig, "train.", _NOT_IN_TRAIN), ("eval", EvalConfig, "eval.", set()),
                ("eval.probe_tasks (entries)", ProbeTaskSpec, "eval.probe_tasks[].", set()),
                ("search", SearchConfig, "search.", set()),
                ("trackers", TrackersConfig, "trackers.", {"wandb"}), ("trackers.wandb", WandbConfig,
                                                                       "trackers.wandb.", set()),
                ("resources", Resources, "resources.", set())]
    for title, model, prefix, skip in sections:
        out += [f"## {title}", "", *_table(model, prefix, skip), ""]
    out += ["## grid axes", "", "Any of these may be an axis (a list of values). "
            f"{', '.join(f'`{a}`' for a in SPECIAL_AXES)} apply to every run; a trainer key to every run; an SAE key "
            "only to the architectures whose config has it (below).", ""]
    shared = set(SAEConfig.model_fields) - _NOT_IN_SAE
    out += ["## sae (every architecture)", "", *_table(SAEConfig, "sae.", _NOT_IN_SAE), ""]
    for name in architecture_names():
        config = registry()[name].Config
        out += [f"## sae: `{name}`", "", *_table(config, "sae.", _NOT_IN_SAE | shared), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
