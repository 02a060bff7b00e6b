"""Two-slot scenes for the toy world: a 64×32 picture with a left and a right 32×32 slot, each holding one shape.

Each slot is drawn by the single-object renderer (:func:`trace_erase.toyworld.render.render`) at 32×32 with the
scene's background, so a slot looks exactly like a single-object sample; an empty slot is flat background.
Deterministic by seed. Masks are taken from pixels (what differs from the flat background), so that they apply to
generated pictures as well as to renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import TraceEraseError
from ..render import BACKGROUNDS, CLASSES, COLORS, STYLES, render

W, H, SLOT = 64, 32, 32
SIDES: tuple[str, ...] = ("left", "right")
P_EMPTY = 0.2  # chance that random_scene leaves a slot empty


@dataclass(frozen=True)
class SlotObject:
    """One shape in a slot: class, colour and style (names from the single-object renderer)."""

    cls: str
    color: str
    style: str

    def __post_init__(self) -> None:
        for value, known, what in ((self.cls, CLASSES, "class"), (self.color, tuple(COLORS), "colour"),
                                   (self.style, STYLES, "style")):
            if value not in known:
                raise TraceEraseError(f"unknown {what} '{value}' in a scene; use one of {', '.join(known)}")


@dataclass(frozen=True)
class Scene:
    """What a scene shows: the object in each slot (``None``: empty) and one background for the whole picture."""

    left: SlotObject | None
    right: SlotObject | None
    background: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise TraceEraseError(f"unknown background '{self.background}' in a scene; "
                                  f"use one of {', '.join(BACKGROUNDS)}")

    def slot(self, side: str) -> SlotObject | None:
        """The object on ``side`` ('left' or 'right')."""
        return getattr(self, check_side(side))

    def objects(self) -> list[SlotObject]:
        """The objects present, left first."""
        return [o for o in (self.left, self.right) if o is not None]


@dataclass
class SceneSample:
    """A rendered scene: ``image`` uint8 ``[32, 64, 3]``, the scene, and each filled slot's render labels
    (centre, radius, rotation as fractions of the slot)."""

    image: np.ndarray
    scene: Scene
    slot_labels: dict[str, dict] = field(default_factory=dict)


def check_side(side: str) -> str:
    """``side`` if it is 'left' or 'right', else a one-line error."""
    if side not in SIDES:
        raise TraceEraseError(f"unknown side '{side}'; a scene has the sides {' and '.join(SIDES)}")
    return side


def other_side(side: str) -> str:
    """'right' for 'left' and vice versa."""
    return SIDES[1 - SIDES.index(check_side(side))]


def slot_slice(side: str) -> slice:
    """Columns of ``side`` in a ``[H, W, 3]`` picture."""
    k = SIDES.index(check_side(side))
    return slice(k * SLOT, (k + 1) * SLOT)


def slot_seed(seed: int, side: str) -> int:
    """The single-object render seed of one slot (derived from the scene seed; left and right differ)."""
    return int(np.random.SeedSequence([int(seed), 1 + SIDES.index(side)]).generate_state(1)[0])


def random_scene(seed: int, p_empty: float = P_EMPTY) -> Scene:
    """A scene drawn from ``seed``: each slot empty with probability ``p_empty``, else any class/colour/style."""
    rng = np.random.default_rng([int(seed), 0])

    def obj() -> SlotObject | None:
        if rng.random() < p_empty:
            return None
        return SlotObject(CLASSES[int(rng.integers(len(CLASSES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                          STYLES[int(rng.integers(len(STYLES)))])

    left, right = obj(), obj()
    return Scene(left, right, list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))])


def render_scene_sample(scene: Scene, seed: int) -> SceneSample:
    """Render ``scene``; the shapes' placement, size, rotation and pattern phase are drawn from ``seed``."""
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    labels = {}
    for side in SIDES:
        obj = scene.slot(side)
        if obj is None:
            continue
        s = render(slot_seed(seed, side), size=SLOT, cls=obj.cls, color=obj.color, style=obj.style,
                   background=scene.background)
        image[:, slot_slice(side)] = s.image
        labels[side] = s.labels
    return SceneSample(image, scene, labels)


def render_scene(scene: Scene, seed: int) -> np.ndarray:
    """The ``[32, 64, 3]`` uint8 picture of ``scene`` (same scene and seed, same pixels)."""
    return render_scene_sample(scene, seed).image


def estimate_background(image: np.ndarray) -> np.ndarray:
    """The background colour of a picture or slot ``[h, w, 3]``: the per-channel median of its outer border
    (shapes rarely reach it)."""
    img = np.asarray(image, np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(border, axis=0)


def slot_mask(image: np.ndarray, side: str, background: str | tuple[int, int, int] | None = None,
              tol: float = 30.0) -> np.ndarray:
    """Bool ``[32, 32]``: the pixels of ``side`` whose RGB (0–255) differs from the flat background by more than
    ``tol`` (Euclidean). ``background``: a name, an RGB triple, or ``None`` to estimate it from the slot's own border
    (so that whatever happened in the other slot does not matter)."""
    img = np.asarray(image, np.float64)
    if img.shape != (H, W, 3):
        raise TraceEraseError(f"a scene picture is {H}×{W}×3, got {img.shape}; pass one picture [H, W, 3] at a time")
    crop = img[:, slot_slice(side)]
    if background is None:
        bg = estimate_background(crop)
    else:
        bg = np.asarray(BACKGROUNDS[background] if isinstance(background, str) else background, np.float64)
    return np.sqrt(((crop - bg) ** 2).sum(-1)) > tol


def silhouette(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled (pixels not reachable from the border through background): the outline of
    an outlined or dotted shape becomes its solid silhouette."""
    mask = np.asarray(mask, bool)
    outside = np.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~mask[0], ~mask[-1], ~mask[:, 0], ~mask[:, -1]
    while True:  # flood fill of the background from the border (4-neighbour dilation restricted to ~mask)
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """``(x, y)`` of the mask's pixels (in slot pixels, pixel centres at integers); ``None`` for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if len(xs) == 0:
        return None
    return float(xs.mean()), float(ys.mean())
