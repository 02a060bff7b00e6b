"""The erasure manifest (``erasure.json``) as typed, versioned classes: what a loaded folder must hold.

``Manifest.parse`` checks a JSON object field by field and refuses anything missing, of the wrong type, from a newer
format, or naming a weight file outside its folder, with one line that names the field (``lora.prefix``). The
erasure keeps the JSON dict as it was written (for ``info`` and reports); the typed view is what code relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from ..errors import TraceEraseError
from ..models.registry import FAMILIES

FORMAT = "trace-erase/erasure"
# 1: first release. 2: adds "runtime" (device/dtype/offload the erasure was made with) and the integrity record.
# 3: config.trajectory keeps the optional parts as nested sub-configs ("adversarial", "eraseanything", "trce",
# "fusion"; None
# when off) where 1 and 2 stored flat keys; TrajectoryConfig.from_options reads both. 4: lora.target_modules may name
# text-encoder modules by their qualified names (``text_encoder.text_model.…``, keyed so in the LoRA file without the
# denoiser's prefix; written only by erasures that have them, the others stay 3). Every earlier version is read.
FORMAT_VERSION = 4
PREFIXES = ("unet", "transformer")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ManifestError(TraceEraseError):
    """An ``erasure.json`` that is not a valid manifest (the message names the field)."""


def _bad(where: str, field: str, what: str) -> ManifestError:
    return ManifestError(f"'{where}' is not a valid erasure manifest: {field} {what}; re-run the erasure")


class _Reader:
    """Typed access to one JSON object, naming the field path in every error."""

    def __init__(self, data: Any, where: str, path: str = ""):
        if not isinstance(data, dict):
            raise _bad(where, path or "the file", "must be a JSON object")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise _bad(self.where, self._name(key), "is missing")
        value = self.data[key]
        if value is None and optional:
            return None
        numeric = kind in (float, (int, float))
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)) if numeric \
            else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            names = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list"}
            raise _bad(self.where, self._name(key), f"must be {names.get(kind, 'a number')}, not {value!r}"[:200])
        return value

    def obj(self, key: str, optional: bool = False) -> _Reader | None:
        value = self.get(key, dict, optional)
        return None if value is None else _Reader(value, self.where, self._name(key))

    def strings(self, key: str) -> list[str]:
        value = self.get(key, list)
        if not all(isinstance(v, str) for v in value):
            raise _bad(self.where, self._name(key), "must be a list of strings")
        return list(value)


def check_file_name(name: str, where: str, field: str) -> str:
    """A weight file named by a manifest must be a plain file name inside the erasure folder."""
    if (not name or name in (".", "..") or PurePosixPath(name).name != name or PureWindowsPath(name).name != name
            or not name.endswith(WEIGHT_SUFFIXES)):
        raise _bad(where, field, f"must be a plain *.safetensors file name inside the folder, not {name!r}")
    return name


@dataclass(frozen=True)
class LoraSpec:
    weight_name: str
    prefix: str
    target_modules: list[str]
    rank: int


@dataclass(frozen=True)
class GateSpec:
    tau: float
    weight_name: str


@dataclass(frozen=True)
class BaseModelSpec:
    source: str
    family: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The fields of ``erasure.json`` that loading, applying and checking an erasure rely on."""

    format_version: int
    method: str
    concepts: list[str]
    base_model: BaseModelSpec
    lora: LoraSpec
    gate: GateSpec | None

    @staticmethod
    def parse(data: Any, where: str) -> Manifest:
        """Validate ``data`` (the parsed JSON of ``where``); one line naming the first bad field otherwise."""
        r = _Reader(data, where)
        if data.get("format") != FORMAT:
            raise ManifestError(f"'{where}' is not a trace-erase manifest (format is not '{FORMAT}'); "
                                "pass an erase output")
        version = r.get("format_version", int)
        if version > FORMAT_VERSION:
            raise ManifestError(f"'{where}' has format_version {version}, newer than this trace-erase reads "
                                f"({FORMAT_VERSION}); upgrade trace-erase")
        if version < 1:
            raise _bad(where, "format_version", f"must be ≥ 1, not {version}")
        method = r.get("method", str)
        concepts = r.get("concepts", list)
        if not concepts:
            raise _bad(where, "concepts", "is empty")
        names = []
        for i, c in enumerate(concepts):
            cr = _Reader(c, where, f"concepts[{i}]")
            names.append(cr.get("name", str))
            cr.get("anchor", str)
            cr.strings("preserve")
        b = r.obj("base_model")
        family = b.get("family", str)
        if family not in FAMILIES:
            raise _bad(where, "base_model.family", f"must be one of {', '.join(FAMILIES)}, not {family!r}")
        fp = b.obj("fingerprint")
        sha = fp.get("sha256", str)
        fp.get("modules", dict)
        b.get("pipeline_class", str)
        base = BaseModelSpec(b.get("source", str), family, sha)
        lr = r.obj("lora")
        prefix = lr.get("prefix", str)
        if prefix not in PREFIXES:
            raise _bad(where, "lora.prefix", f"must be one of {', '.join(PREFIXES)}, not {prefix!r}")
        rank = lr.get("rank", int)
        if rank < 0:
            raise _bad(where, "lora.rank", f"must be ≥ 0, not {rank}")
        lora = LoraSpec(check_file_name(lr.get("weight_name", str), where, "lora.weight_name"), prefix,
                        lr.strings("target_modules"), rank)
        gate = None
        g = r.obj("gate", optional=True)
        if g is not None:
            tau = float(g.get("tau", float))
            if not 0 < tau <= 1:
                raise _bad(where, "gate.tau", f"must be in (0, 1], not {tau}")
            gate = GateSpec(tau, check_file_name(g.get("weight_name", str), where, "gate.weight_name"))
        r.obj("timings").get("wall_time_s", float)
        r.obj("memory").get("peak_rss_mb", float)
        if version >= 2:
            r.obj("runtime")
        return Manifest(version, method, names, base, lora, gate)
