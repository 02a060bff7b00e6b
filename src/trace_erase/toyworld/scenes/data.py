"""Scene training sets: random two-slot scenes rendered with JSON-able labels, some class pairs held out."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..data import RenderedSet
from .render import H, Scene, SlotObject, W, random_scene, render_scene


def scene_labels(scene: Scene) -> dict:
    """A :class:`~.render.Scene` as a JSON-able dict (the training set stores labels as JSON)."""
    slot = {s: None if (o := scene.slot(s)) is None else {"class": o.cls, "color": o.color, "style": o.style}
            for s in ("left", "right")}
    return {**slot, "background": scene.background}


def scene_from_labels(labels: dict) -> Scene:
    """The :class:`~.render.Scene` of :func:`scene_labels`' dict."""
    def obj(d: dict | None) -> SlotObject | None:
        return None if d is None else SlotObject(d["class"], d["color"], d["style"])

    return Scene(obj(labels["left"]), obj(labels["right"]), labels["background"])


def render_scenes(first_seed: int, n: int, skip_pairs: tuple[tuple[str, str], ...] = (),
                  progress: bool = True) -> RenderedSet:
    """``n`` random two-slot scenes (uint8 ``[n, 32, 64, 3]``), drawn from seeds ``first_seed ..`` and skipping those
    whose (left, right) classes are one of ``skip_pairs`` (held out of training); labels: :func:`scene_labels`."""
    skip = set(skip_pairs)
    images = np.empty((n, H, W, 3), np.uint8)
    labels, seeds = [], []
    seed = first_seed
    bar = tqdm(total=n, desc="rendering scenes", disable=not progress or n < 2000)
    while len(seeds) < n:
        scene = random_scene(seed)
        if not (scene.left and scene.right and (scene.left.cls, scene.right.cls) in skip):
            images[len(seeds)] = render_scene(scene, seed)
            labels.append(scene_labels(scene))
            seeds.append(seed)
            bar.update(1)
        seed += 1
    bar.close()
    return RenderedSet(images, labels, seeds)
