"""Typed options: concepts with their anchors and preserve lists, and YAML files that map 1:1 onto them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TraceEraseError


@dataclass
class Concept:
    """A concept to erase, the surrogate it is mapped to, and concepts that must stay intact."""

    name: str
    anchor: str = ""
    preserve: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = (self.name or "").strip()
        self.anchor = (self.anchor or "").strip()
        self.preserve = [p.strip() for p in self.preserve if p and p.strip()]
        if not self.name:
            raise TraceEraseError("the concept is empty; pass the words to erase, e.g. --concept 'van gogh'")
        if self.anchor.lower() == self.name.lower():
            raise TraceEraseError(
                f"the anchor equals the concept ('{self.name}'); choose a different surrogate, e.g. a super-category "
                "or '' (empty)"
            )
        if any(p.lower() == self.name.lower() for p in self.preserve):
            raise TraceEraseError(f"'{self.name}' is both erased and preserved; remove it from --preserve")


def make_concepts(
    concepts: list[str | Concept | dict[str, Any]], anchor: str | None = None, preserve: list[str] | None = None
) -> list[Concept]:
    """Normalise strings/dicts into :class:`Concept`; ``anchor``/``preserve`` apply where a concept sets none."""
    if not concepts:
        raise TraceEraseError("no concept given; pass at least one --concept")
    out = []
    for c in concepts:
        if isinstance(c, Concept):
            out.append(c)
        elif isinstance(c, dict):
            unknown = set(c) - {"name", "anchor", "preserve"}
            if unknown:
                raise TraceEraseError(f"unknown concept keys {sorted(unknown)}; use name, anchor, preserve")
            merged = {"anchor": anchor or "", "preserve": list(preserve or []), **c}
            out.append(Concept(**merged))
        else:
            out.append(Concept(str(c), anchor or "", list(preserve or [])))
    names = [c.name.lower() for c in out]
    if len(set(names)) != len(names):
        raise TraceEraseError("a concept is listed twice; list each concept once")
    erased = {n.strip() for n in names}
    for c in out:  # erased and mapped to at once
        anchor = c.anchor.strip().lower()
        if anchor in erased and anchor != c.name.strip().lower():
            raise TraceEraseError(f"'{c.anchor}' is both an erased concept and the anchor of '{c.name}'; "
                                  "choose another anchor")
    return out


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typing.get_origin(tp) is list:
        return "a list of numbers" if typing.get_args(tp) == (float,) else "a list of strings"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` for a field annotated ``annotation`` (int, float, str, bool, list[str], list[float], or ``X | None``),
    with ints widened to floats; anything else is one line naming the option and the type it takes."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args and typing.get_origin(annotation) is not list else \
        [annotation]
    if value is None:
        if optional:
            return None
        raise TraceEraseError(f"option '{key}' takes {_type_name(kinds[0])}, not null")
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise TraceEraseError(f"option '{key}' must be a finite number, not {value}")
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return check_value(key, float(value), annotation)  # YAML 1.1 reads 1e-5 (no dot) as text
        if typing.get_origin(kind) is list and isinstance(value, list):
            if typing.get_args(kind) == (float,):
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                    return [float(v) for v in value]
            elif all(isinstance(v, str) for v in value):
                return list(value)
    wanted = " or ".join(_type_name(k) for k in kinds) + (" (or null)" if optional else "")
    raise TraceEraseError(f"option '{key}' takes {wanted}, not {value!r}")


def config_from_dict(cls: type, values: dict[str, Any], where: str = "options") -> Any:
    """Build dataclass ``cls`` from ``values``, refusing unknown keys (with the list of valid ones) and values of the
    wrong type (naming the option and the type it takes) before any model is loaded. A config with typed
    sub-configs reads its flat option keys itself (``from_options``)."""
    if hasattr(cls, "from_options"):
        return cls.from_options(values, where=where)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - valid
    if unknown:
        raise TraceEraseError(f"unknown {where} {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}")
    hints = typing.get_type_hints(cls)
    checked = {k: check_value(k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise TraceEraseError(f"bad {where}: {exc}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (a mapping), with one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise TraceEraseError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TraceEraseError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise TraceEraseError(f"config file '{path}' must hold a mapping of option: value")
    return data


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a run's settings (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two run configs (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(prefix + key)
    return out
