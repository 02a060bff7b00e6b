"""An ImageNet classifier by path as a scorer: top-1 over its outputs, mapped to the suite's classes by a class map
(``{"church": [497], ...}``; the imagenette class set carries its own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import TraceEraseError
from ..backends import ImageNetBackend
from ..suites import PromptItem, Suite
from .base import PROVIDES, Scorer, digest, version


class ImageNetScorer(Scorer):
    """Top-1 class index → the suite class whose indices contain it (``imagenet-<index>`` for any other)."""

    kind = "imagenet"
    provides = PROVIDES["imagenet"]

    def __init__(self, weights: Path, arch: str | None = None, class_map: str | None = None,
                 allow_pickle: bool = False, device: str = "cpu"):
        super().__init__()
        self.backend = ImageNetBackend(weights, arch=arch, allow_pickle=allow_pickle)
        self.backend.model.to(device)
        self.device = device
        self.class_map: dict[str, tuple[int, ...]] | None = _read_map(class_map) if class_map else None
        self.identity.update({"name": "imagenet-classifier", "path": str(weights), "arch": arch or "torchscript",
                              "sha256": digest(weights), "version": f"torch {version('torch')}",
                              "class_map": str(class_map) if class_map else None})

    def _map(self, suite: Suite) -> dict[str, tuple[int, ...]]:
        if self.class_map is not None:
            return self.class_map
        if suite.class_set is not None and suite.class_set.imagenet_index:
            return dict(suite.class_set.imagenet_index)
        raise TraceEraseError(f"the imagenet scorer needs --class-map FILE (JSON: class → ImageNet indices) for the "
                              f"{suite.class_set.name if suite.class_set else suite.name} classes")

    def check(self, suite: Suite) -> None:
        super().check(suite)
        mapping = self._map(suite)
        missing = [lab for lab in suite.labels if not mapping.get(lab)]
        if missing:
            raise TraceEraseError(f"the class map does not cover {', '.join(missing[:5])}; add their ImageNet indices "
                                  "to --class-map")

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        index = {i: lab for lab, ids in self._map(suite).items() for i in ids}
        logits = self.backend.logits(list(images), device=self.device)
        return [{"label": index.get(int(i), f"imagenet-{int(i)}"), "index": int(i)} for i in logits.argmax(1)]


def _read_map(path: str) -> dict[str, tuple[int, ...]]:
    p = Path(path)
    if not p.is_file():
        raise TraceEraseError(f"class map '{path}' not found; pass a JSON file {{\"class\": [ImageNet index, ...]}}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise TraceEraseError(f"class map '{path}' is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list | int) for v in data.values()):
        raise TraceEraseError(f"class map '{path}' must map each class to a list of ImageNet indices")
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in data.items()}
