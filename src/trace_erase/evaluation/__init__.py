"""Evaluation: suites (what to draw), scorers (who judges each image), metric formulas, the eval and rescore runners
and the report. The bench over methods and concepts is :mod:`trace_erase.benchmark`.

Python use::

    from trace_erase.evaluation import evaluate, rescore
    res = evaluate(handle, erasure, "objects", "cat", "out/cat", scorer="clip:/models/clip-vit-large-patch14")
    rescore("out/cat", "imagenet:/models/resnet50.safetensors", "out/cat-resnet",
            ScorerOptions(arch="resnet50", class_map="map.json"))
"""

from __future__ import annotations

from typing import Any

from .metrics import h_identities, h_objects, h_styles, pixel_drift, ssim, suite_metrics

# the runners and the suite/scorer builders import the model stack: loaded on first use
_LAZY = {
    "evaluate": ".run", "rescore": ".rescoring", "build_suite": ".suites", "Suite": ".suites",
    "PromptItem": ".suites", "build_scorer": ".scorers", "scorer_for": ".scorers", "Scorer": ".scorers",
    "ScorerOptions": ".scorers",
}

__all__ = ["h_identities", "h_objects", "h_styles", "pixel_drift", "ssim", "suite_metrics", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
