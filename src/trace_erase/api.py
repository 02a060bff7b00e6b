"""The Python API: ``erase(pipe, concepts=[...], method=...)`` → :class:`Erasure` (``.save``, ``.apply``)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import resource
import time
from typing import Any

import torch

from .artifacts.erasure import FORMAT, FORMAT_VERSION, LORA_WEIGHT_NAME, Erasure
from .artifacts.fingerprint import fingerprint
from .artifacts.lora import deltas_to_state_dict
from .config import Concept, config_from_dict, make_concepts
from .engines.closed_form import ClosedFormConfig, ClosedFormEngine
from .errors import TraceEraseError
from .methods import get_method
from .models import ModelHandle, get_adapter


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("trace-erase", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_memory_mb() -> dict[str, float]:
    """Process peak resident memory (and CUDA peak allocation when a GPU is used), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _summary(cert: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("erasure_residual", "erasure_residual_before", "collateral_preserve", "collateral_probe"):
        vals = [c[key] for c in cert.values() if c.get(key) is not None]
        out[f"{key}_max"] = max(vals) if vals else None
        out[f"{key}_mean"] = sum(vals) / len(vals) if vals else None
    return out


def erase(
    pipe: Any,
    concepts: list[str | Concept | dict[str, Any]],
    method: str = "trace-closed-form",
    anchor: str | None = None,
    preserve: list[str] | None = None,
    model_id: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Erasure:
    """Erase ``concepts`` from ``pipe`` (a diffusers pipeline or a :class:`ModelHandle`) with ``method``.

    ``options`` are the method's engine options (see ``trace-erase erase --help`` / the YAML keys). The pipeline is
    never modified; the result is an :class:`Erasure` to ``.save(dir)`` or ``.apply(pipe, scale)``.
    """
    start = time.perf_counter()
    if isinstance(pipe, ModelHandle):
        adapter, source = pipe.adapter, model_id or pipe.source
    else:
        adapter = get_adapter(pipe)
        source = model_id or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "in-memory"
    spec = get_method(method)
    if adapter.family not in spec.families:
        raise TraceEraseError(f"method '{method}' does not support {adapter.family}; it supports {spec.families}")
    concept_list = make_concepts(concepts, anchor=anchor, preserve=preserve)
    config = config_from_dict(ClosedFormConfig, {**spec.defaults, **options}, where=f"options for '{method}'")

    engine = ClosedFormEngine(adapter, config, progress=progress)
    result = engine.run(concept_list)
    base_print = fingerprint(adapter, list(result.deltas))
    state, ranks = deltas_to_state_dict(result.deltas, adapter.denoiser_name, config.rank_tolerance)
    wall = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": spec.name,
        "engine": spec.engine,
        "config": dataclasses.asdict(config),
        "concepts": [dataclasses.asdict(c) for c in concept_list],
        "base_model": {"source": str(source), **adapter.describe(), "fingerprint": base_print},
        "lora": {
            "weight_name": LORA_WEIGHT_NAME,
            "prefix": adapter.denoiser_name,
            "target_modules": list(result.deltas),
            "rank": int(next(iter(state.values())).shape[0]) if state else 0,
            "numerical_ranks": ranks,
        },
        "streams": result.streams,
        "rows": result.counts,
        "certificate": {"summary": _summary(result.certificate), "per_module": result.certificate},
        "timings": {**result.timings, "wall_time_s": wall},
        "memory": peak_memory_mb(),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return Erasure(state, manifest)
