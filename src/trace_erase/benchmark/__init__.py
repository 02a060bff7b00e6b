"""Benchmarks over methods and concepts, above evaluation and attacks: :func:`run_bench` (every method on every
concept on the same seeds, optionally attacked), its tables (:mod:`.tables`) and the many-concepts protocol
(:func:`run_multi_bench`, in :mod:`.many_concepts`)."""

from __future__ import annotations

from typing import Any

_LAZY = {"run_bench": ".bench", "parse_sweep": ".bench", "run_multi_bench": ".many_concepts",
         "summarize": ".tables", "markdown": ".tables", "merge_results": ".tables"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
