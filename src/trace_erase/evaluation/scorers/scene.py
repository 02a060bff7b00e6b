"""The bundled per-slot scene scorer (or one saved by ``train_scene_scorer``) as a scorer: per picture, each slot's
class (or 'empty'), colour and style, and the background."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...toyworld.scenes.render import H, W
from ...toyworld.scenes.scorer import SCORER_DIR, load_scene_scorer
from ..suites import PromptItem, Suite
from .base import PROVIDES, Scorer, digest


class SceneScorer(Scorer):
    """Per-slot judgements ``{"left": {"class", "color", "style"}, "right": {...}, "background"}`` of 64×32
    pictures; refuses, on load, a folder without per-slot heads (e.g. the single-object toy classifier)."""

    kind = "scene"
    provides = PROVIDES["scene"]
    image_size = (H, W)  # (height, width) of the pictures it judges

    def __init__(self, folder: str | Path | None = None):
        super().__init__()
        path = Path(folder) if folder else SCORER_DIR
        self.model = load_scene_scorer(path)
        cfg = json.loads((path / "config.json").read_text())
        self.identity.update({"name": "toy-scene-scorer", "path": str(path),
                              "sha256": digest(path / "model.safetensors"),
                              "heldout_accuracy": cfg.get("heldout_accuracy")})

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        return self.model.predict_labels(np.asarray(images))
