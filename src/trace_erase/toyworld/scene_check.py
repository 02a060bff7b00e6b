"""Quality check of a scene pipeline (toy-sd-scenes, toy-flux-scenes): does it put the named objects in the named
slots, with their colours, and leave an unnamed slot empty? Scored by the bundled per-slot scene scorer.

The two-object prompts use only the class pairs no training picture shows together (``SCENE_HELDOUT_PAIRS``), so
those captions are held out of training; single-object captions cannot be (each class must be seen alone on each
side), so that test relies on sampling seeds only. Each test draws picture ``i`` from sampling seed ``i``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceEraseError
from .config import SCENE_HELDOUT_PAIRS
from .render import CLASSES, COLORS
from .scenes.render import SIDES, other_side

# the bars toy-sd-scenes must meet
BARS: dict[str, float] = {"class": 0.90, "side": 0.90, "color": 0.85, "empty": 0.90}
# per family: toy-flux-scenes' class bar is lower (toy-flux draws the named single object 0.90 of the time, toy-sd 1.00)
FAMILY_BARS: dict[str, dict[str, float]] = {"sd": BARS, "flux": {**BARS, "class": 0.80}}
LABELS: dict[str, str] = {
    "class": "both slots show the named classes (held-out pairs)",
    "side": "each object on its named side (held-out pairs)",
    "color": "each object has its named colour (held-out pairs, two colours)",
    "empty": "a single-object caption leaves the other slot empty",
    "single_side": "a single object on its named side",
}


def model_world(model: str) -> str:
    """'scenes' or 'objects': what the pipeline ``model`` was trained on, from its sidecar (no weights load); a model
    without the toy sidecar counts as 'objects'."""
    from ..models.loading import SIDECAR, resolve_model

    sidecar = Path(resolve_model(model)) / SIDECAR
    if not sidecar.is_file():
        return "objects"
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as exc:
        raise TraceEraseError(f"'{sidecar}' is not valid JSON ({exc}); retrain the model or restore the file") from exc
    return str(meta.get("training", {}).get("world", "objects"))


def require_scene_model(model: str) -> None:
    """One line, before any load, unless ``model`` is a scene pipeline."""
    if model_world(model) != "scenes":
        raise TraceEraseError(f"'{model}' is not a scene model (its sidecar records no world 'scenes'); the scene "
                              "check takes toy-sd-scenes, toy-flux-scenes or a folder written by "
                              "`trace-erase toyworld train --scenes`")


def scene_bars(family: str) -> dict[str, float]:
    """The bars a scene model of ``family`` ('sd', 'flux') must meet (another family gets toy-sd-scenes')."""
    return FAMILY_BARS.get(family, BARS)


def _a(text: str) -> str:
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def scene_prompts(seeds: int) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per test, ``seeds`` (prompt, expectation) pairs: 'pairs' (classes on sides, half the prompts naming the right
    side first), 'color' (the same with two different colours), 'single' (one class on one side)."""
    if seeds < 1:
        raise TraceEraseError(f"--seeds must be ≥ 1 (got {seeds})")
    colors = list(COLORS)
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {"pairs": [], "color": [], "single": []}
    for i in range(seeds):
        left, right = SCENE_HELDOUT_PAIRS[i % len(SCENE_HELDOUT_PAIRS)]
        parts = [f"{_a(left)} on the left", f"{_a(right)} on the right"]
        out["pairs"].append((" and ".join(parts if i % 2 == 0 else parts[::-1]), {"left": left, "right": right}))
        cl = colors[i % len(colors)]
        cr = colors[(i + 1 + (i // len(colors)) % (len(colors) - 1)) % len(colors)]
        parts = [f"{_a(f'{cl} {left}')} on the left", f"{_a(f'{cr} {right}')} on the right"]
        out["color"].append((" and ".join(parts if i % 2 == 0 else parts[::-1]),
                             {"left": left, "right": right, "left_color": cl, "right_color": cr}))
        cls, side = CLASSES[i % len(CLASSES)], SIDES[(i // len(CLASSES)) % 2]
        out["single"].append((f"{_a(cls)} on the {side}", {side: cls, other_side(side): None}))
    return out


def _images(handle: Any, prompts: list[str], progress: bool) -> np.ndarray:
    from ..sampling import generate_images

    imgs = generate_images(handle, prompts, list(range(len(prompts))), progress=progress)
    return np.stack([np.asarray(im.convert("RGB")) for im in imgs])


def score_scenes(prompts: dict[str, list[tuple[str, dict[str, Any]]]], preds: dict[str, list[dict]]) -> dict[str,
                                                                                                            float]:
    """The check's figures from per-test scorer predictions (:meth:`SceneScorer.predict_labels`), one per prompt:
    'class' (both slots show the two named classes, in either order), 'side' (each on its named side), 'color' (per
    object: its slot shows its named colour), 'empty' (the unnamed slot is empty), 'single_side'."""
    pairs = [(p["left"]["class"], p["right"]["class"], e) for p, (_, e) in zip(preds["pairs"], prompts["pairs"],
                                                                                 strict=True)]
    color = [p[s]["color"] == e[f"{s}_color"] for p, (_, e) in zip(preds["color"], prompts["color"], strict=True)
             for s in SIDES]
    single = [(p, e) for p, (_, e) in zip(preds["single"], prompts["single"], strict=True)]
    return {
        "class": float(np.mean([sorted((a, b)) == sorted((e["left"], e["right"])) for a, b, e in pairs])),
        "side": float(np.mean([(a, b) == (e["left"], e["right"]) for a, b, e in pairs])),
        "color": float(np.mean(color)),
        "empty": float(np.mean([all(p[s]["class"] == "empty" for s in SIDES if e[s] is None) for p, e in single])),
        "single_side": float(np.mean([all(p[s]["class"] == e[s] for s in SIDES if e[s] is not None)
                                      for p, e in single])),
    }


def scene_quality_check(handle: Any, seeds: int = 50, scorer: Any = None, progress: bool = True) -> dict[str, Any]:
    """Sample each test's ``seeds`` prompts (seed ``i`` for prompt ``i``) and score them: the figures of
    :func:`score_scenes`, the bars of the model's family (:func:`scene_bars`), whether each is met, and the scorer's
    per-slot class histogram of the pairs."""
    from .scenes.scorer import load_scene_scorer

    prompts = scene_prompts(seeds)
    scorer = scorer or load_scene_scorer()
    preds = {k: scorer.predict_labels(_images(handle, [p for p, _ in v], progress)) for k, v in prompts.items()}
    figures = score_scenes(prompts, preds)
    bars = scene_bars(handle.adapter.family)
    return {
        "seeds": seeds,
        "heldout_pairs": [list(p) for p in SCENE_HELDOUT_PAIRS],
        "figures": figures,
        "bars": bars,
        "passed": {k: figures[k] >= bar for k, bar in bars.items()},
        "prompts": {k: [p for p, _ in v] for k, v in prompts.items()},
        "predictions": preds,
    }
