"""CLIP as a scorer: zero-shot classification over the suite's label prompts, and CLIP score against each image's
own prompt (100 · max(cos, 0), Hessel et al. — torchmetrics' per-pair definition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..backends import ClipBackend
from ..suites import PromptItem, Suite
from .base import PROVIDES, Scorer, digest, version


class ClipScorer(Scorer):
    """A local ``CLIPModel`` folder. Labels: the best-matching label text (the suite's zero-shot prompts, e.g. "a
    photo of the {class}" for the objects suite, else the label itself). Scores: CLIP score with the item's prompt."""

    kind = "clip"
    provides = PROVIDES["clip"]

    def __init__(self, folder: Path, device: str = "cpu"):
        super().__init__()
        self.backend = ClipBackend(folder, device=device)
        self.identity.update({"name": "clip", "path": str(folder), "sha256": digest(folder),
                              "version": f"transformers {version('transformers')}",
                              "image_size": self.backend.size})

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        if suite.needs == "label":
            labels = list(suite.labels)
            texts = [suite.zero_shot.get(lab, lab) for lab in labels]
            best = self.backend.best_text(list(images), texts)
            return [{"label": labels[int(i)]} for i in best]
        scores = self.backend.score(list(images), [i.prompt for i in items])
        return [{"score": float(s)} for s in scores]
