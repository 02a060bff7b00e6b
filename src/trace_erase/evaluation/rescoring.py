"""Score a finished evaluation again with another scorer, from its saved images (nothing is regenerated)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceEraseError
from ..io import check_writable
from .scorers import Scorer, ScorerOptions, scorer_for
from .scoring import check_protocol, score_run
from .suites import PromptItem, Suite, build_suite


def _read(folder: Path, side: str, n: int) -> np.ndarray:
    from PIL import Image

    out = []
    for k in range(n):
        path = folder / "images" / side / f"{k:05d}.png"
        if not path.is_file():
            raise TraceEraseError(f"'{path}' is missing; rescore needs the images an evaluation saved")
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def saved_suite(results: dict[str, Any]) -> Suite:
    """The suite an evaluation ran, rebuilt from its results.json: the items exactly as drawn, the labels and
    class set as the suite defines them."""
    s = results["settings"].get("suite")
    if not isinstance(s, dict):
        raise TraceEraseError("this results.json predates per-image records (no settings.suite); evaluate again")
    items = [PromptItem(p["prompt"], p["seed"], p["group"], p["label"], p.get("head", "class"), p.get("guidance"),
                        tuple(p["sides"]) if p.get("sides") else None) for p in results["prompts"]]
    class_set = s.get("class_set")
    classes = class_set if results["suite"] == "objects" else None
    ref = build_suite(results["suite"], s["concept"], 1, classes=classes,
                      retained=None) if results["suite"] not in ("nudity", "coco") else None
    labels = tuple(s.get("labels") or ())
    if ref is not None:
        return Suite(ref.name, ref.concept, items, labels or ref.labels, ref.zero_shot, ref.class_set, s["source"])
    return Suite(results["suite"], s["concept"], items, labels, {}, None, s["source"])


def rescore(folder: str | Path, scorer: str | Scorer | None, output: str | Path,
            options: ScorerOptions | None = None, reference: str | Path | None = None, overwrite: bool = False,
            fid_features: str = "toy", fid_weights: str | Path | None = None,
            show_nudity: bool = False) -> dict[str, Any]:
    """Judge the saved base/erased images of evaluation ``folder`` with ``scorer`` and write a new evaluation folder
    at ``output`` (images, results.json with the new scorer's identity, report). Sampler, seeds and prompts are the
    original run's."""
    from .run import write_results

    src = Path(folder)
    path = src / "results.json"
    if not path.is_file():
        raise TraceEraseError(f"'{src}' has no results.json; pass an evaluation output folder")
    results = json.loads(path.read_text())
    if Path(output).resolve() == src.resolve():
        raise TraceEraseError("rescore writes a new folder; pass --output different from the evaluation folder")
    if Path(output).exists() and not overwrite:

        check_writable(output, overwrite, "rescore output")
    suite = saved_suite(results)
    if not isinstance(scorer, Scorer):
        scorer = scorer_for(suite, scorer, options)
    if suite.name == "coco" and reference is None:
        reference = results["settings"]["quality"].get("reference")
    check_protocol(suite, reference)
    n = len(suite.items)
    base = _read(src, "base", n)
    erased = base if results["method"] == "base" else _read(src, "erased", n)
    metrics, per_image = score_run(suite, scorer, base, erased, reference=reference, fid_features=fid_features,
                                   fid_weights=fid_weights)
    new = {**results, "metrics": metrics, "per_image": per_image,
           "settings": {**results["settings"], "scorer": scorer.identity,
                        "rescored_from": {"folder": str(src), "scorer": results["settings"].get("scorer")}}}
    new["settings"]["quality"] = {**results["settings"].get("quality", {}),
                                  "reference": str(reference) if reference else None, "clip_model": None}
    write_results(Path(output), overwrite, new, base, erased, show_nudity)
    new["report"] = str(Path(output) / "report.html")
    return new
