"""The bundled toy classifier as a scorer (class and style heads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import TraceEraseError
from ...toyworld.classifier import CLASSIFIER_DIR, load_classifier
from ...toyworld.render import CLASSES, STYLES
from ..suites import PromptItem, Suite
from .base import PROVIDES, Scorer, digest

HEAD_LABELS = {"class": CLASSES, "style": STYLES}


class ToyScorer(Scorer):
    """Top-1 of the toy classifier's head for each image (``class`` or ``style``, as the item says)."""

    kind = "toy"
    provides = PROVIDES["toy"]

    def __init__(self, folder: str | Path | None = None):
        super().__init__()
        path = Path(folder) if folder else CLASSIFIER_DIR
        self.model = load_classifier(path)
        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        self.identity.update({"name": "toy-classifier", "path": str(path),
                              "sha256": digest(path / "model.safetensors"),
                              "version": cfg.get("version"), "heldout_accuracy": cfg.get("heldout_accuracy")})

    def check(self, suite: Suite) -> None:
        super().check(suite)
        head = "style" if suite.name == "toy-styles" else "class"
        missing = [lab for lab in suite.labels if lab not in HEAD_LABELS[head]]
        if missing:
            raise TraceEraseError(f"the toy classifier knows only the toy {head}es ({', '.join(HEAD_LABELS[head])}); "
                                  f"it cannot score {', '.join(missing[:5])}; use --classes toy, or a real scorer")

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        pred = self.model.predict(np.asarray(images))
        return [{"label": HEAD_LABELS[item.head][int(pred[item.head][k])]} for k, item in enumerate(items)]
