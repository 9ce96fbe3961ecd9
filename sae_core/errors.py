"""User-facing errors: each carries one message that names the file, the key and what is allowed.

The CLI prints the message alone (no traceback) and exits non-zero, so the message must stand on its own.
"""
from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class SAEScalingError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(SAEScalingError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(SAEScalingError):
    """An activation file, model or corpus is missing or malformed."""


def format_error_entry(e: dict, source: str = "config", prefix: str = "") -> str:
    """`source: key.path: what is wrong (got X)` for one pydantic error; a validator's message that names
    its own keys (raised at the model's top level) is given as it is."""
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
    key = ".".join(p for p in (prefix, loc) if p)
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return f"{source}: {msg}"
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{source}: {key}: {msg}{shown}"


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "dict", "list", "none"}


def _union_tag(part: Any) -> bool:
    """pydantic names the union member an error comes from in its loc (`float`, `literal['auto']`, `list[int]`)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or re.fullmatch(r"[\w-]+\[.*\]", part) is not None)


def merge_union_errors(errors: list[dict]) -> list[dict]:
    """pydantic reports a value that no member of a union accepts once per member, each loc naming the member
    (`lr.float`, `lr.literal['auto']`): merge those into one error at the field's own loc."""
    out: list[dict] = []
    groups: dict[tuple, dict] = {}
    for e in errors:
        loc = tuple(e.get("loc", ()))
        cut = next((i for i, p in enumerate(loc) if _union_tag(p)), None)
        if cut is None:
            out.append(e)
            continue
        rest = ".".join(str(p) for p in loc[cut + 1:] if not _union_tag(p))
        msg = e["msg"].removeprefix("Value error, ") + (f" (at {rest})" if rest else "")
        group = groups.get(loc[:cut])
        if group is None:
            group = groups[loc[:cut]] = {"type": "union", "loc": loc[:cut], "msg": msg, "input": None}
            out.append(group)
        else:
            group["msg"] += f"; or {msg}"
        if len(loc) == cut + 1:  # the member saw the whole value
            group["input"] = e.get("input")
    return out


def format_pydantic_error(err, source: str = "config", prefix: str = "") -> str:
    """One line per problem."""
    return "\n".join(format_error_entry(e, source, prefix) for e in merge_union_errors(err.errors()))


def validate(model_cls: type[Model], data: Any, source: str = "config", prefix: str = "") -> Model:
    """model_cls.model_validate(data), failing with one ConfigError that names the file and each key."""
    if isinstance(data, model_cls):
        return data
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_pydantic_error(err, source, prefix)) from None
