"""Typed config sections: frozen dataclasses validated once, with errors that name the field path.

A section is a frozen dataclass declared with `@section`; its fields carry types and constraints
(`Annotated[int, Field(ge=1)]`, `Literal[...]`) and pydantic checks them, with nested sections,
mappings of sections and unknown fields. `parse(Section, mapping, "train")` returns the validated
instance or raises `ConfigError` whose message starts with the full path:

    train.steps: must be >= 1, got 0
    no field 'train.stpes'; did you mean 'train.steps'?

ml_collections stays the file format and the `--config.x=y` override layer; this module only turns
the resulting nested mapping into typed, immutable values.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import pydantic

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the field's full dotted path."""


def unknown_field(path: str, name: str, known: Iterable[str]) -> ConfigError:
    """`no field 'train.stpes'; did you mean 'train.steps'?` (or the list of known fields)."""
    prefix = f"{path}." if path else ""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known fields: {', '.join(known)}"
    return ConfigError(f"no field '{prefix}{name}'; {hint}")


def section(cls: type[T]) -> type[T]:
    """Declares a config section: a frozen, keyword-only dataclass that refuses unknown fields."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)  # type: ignore[attr-defined]
    return cls


def _join(path: str, loc: Iterable[Any]) -> str:
    return ".".join([path, *(str(part) for part in loc)] if path else [str(part) for part in loc])


def _field_names(schema: Any, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) section that `loc` points into, for did-you-mean hints."""
    cls = schema
    for part in loc:
        field_type = _resolved_types(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if field_type is None:
            return []
        cls = _section_type(field_type)
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _resolved_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=False)
    except Exception:  # noqa: BLE001  (unresolvable hints: no suggestions, the error still names the field)
        return {}


def _section_type(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself, Optional[...] or Mapping[str, ...]), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _message(error: Mapping[str, Any], path: str, schema: Any) -> str:
    loc = tuple(error["loc"])
    where = _join(path, loc)
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = _join(path, loc[:-1])
        return str(unknown_field(parent, str(loc[-1]), _field_names(schema, loc[:-1])))
    if error["type"] == "missing":
        return f"{where}: missing"
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, ConfigError):  # a section's own check, whose message names a relative field
        return f"{where}.{original}" if where else str(original)
    message = error["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    got = "" if "got" in message else f", got {error['input']!r}"
    return f"{where}: {message}{got}"


def parse(schema: type[T], values: Any, path: str = "") -> T:
    """Validates `values` (nested mappings, or an instance) into `schema`; raises ConfigError."""
    try:
        return pydantic.TypeAdapter(schema).validate_python(values)
    except pydantic.ValidationError as e:
        raise ConfigError(_message(e.errors(include_url=False)[0], path, schema)) from None


def to_dict(value: Any) -> Any:
    """A section (or anything holding sections) as plain JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    return value
