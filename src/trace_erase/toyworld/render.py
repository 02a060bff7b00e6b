"""Procedural images for the toy world: one coloured, patterned shape on a plain background, with its caption.

Deterministic by seed (numpy + PIL). Shapes are drawn at 4× and downsampled, so edges are anti-aliased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow", "diamond", "house",
)
SYNONYMS: dict[str, tuple[str, str, str]] = {
    "circle": ("disc", "round", "orb"),
    "square": ("box", "block", "tile"),
    "triangle": ("trigon", "pyramid", "wedge"),
    "star": ("pentagram", "starburst", "asterisk"),
    "cross": ("plus", "plus sign", "crossmark"),
    "heart": ("love heart", "valentine", "heartshape"),
    "crescent": ("moon", "half moon", "lune"),
    "arrow": ("pointer", "arrowhead", "dart"),
    "diamond": ("rhombus", "lozenge", "gem"),
    "house": ("hut", "home", "cabin"),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 25),
}
STYLES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "outlined")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (185, 185, 185),
    "black": (45, 45, 45),
    "beige": (235, 222, 190),
}
TEMPLATES: tuple[str, ...] = (
    "{a} {desc}",
    "a photo of {a} {desc}",
    "an image of {a} {desc}",
    "a drawing of {a} {desc}",
    "a picture of {a} {desc}",
    "{a} {desc} on a {bg} background",
    "a simple {desc}",
    "one {desc}",
    "a rendering of {a} {desc}",
    "{a} {desc} in the middle",
)
SUPERSAMPLE = 4


@dataclass
class Sample:
    """A rendered image (``H×W×3`` uint8), its labels and one caption."""

    image: np.ndarray
    labels: dict
    caption: str


def vocabulary() -> list[str]:
    """Every word captions and the erasure templates use (for the toy tokenizers)."""
    words: set[str] = set()
    texts = [*CLASSES, *(s for syn in SYNONYMS.values() for s in syn), *COLORS, *STYLES, *BACKGROUNDS, *TEMPLATES]
    for t in texts:
        words.update(t.replace("{a}", "a an").replace("{desc}", "").replace("{bg}", "").split())
    return sorted(words)


def _polygon(cls: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Unit-scale outline(s) of a class, centred at 0 (y down)."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if cls == "circle":
        return [np.stack([np.cos(t), np.sin(t)], 1)]
    if cls == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.82]
    if cls == "triangle":
        return [np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]], float)]
    if cls == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)]
    if cls == "cross":
        a, b = 0.3, 0.95
        return [np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                          [-b, -a], [-a, -a]], float)]
    if cls == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 16.5
        return [pts]
    if cls == "arrow":
        return [np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.28],
                          [-1, 0.28]], float)]
    if cls == "diamond":
        return [np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], float)]
    if cls == "house":
        return [np.array([[0, -1], [0.85, -0.2], [0.85, 0.9], [-0.85, 0.9], [-0.85, -0.2]], float)]
    if cls == "crescent":  # drawn as a disc minus a shifted disc (see _mask)
        return [np.stack([np.cos(t), np.sin(t)], 1), np.stack([np.cos(t) * 0.85 + 0.45, np.sin(t) * 0.85 - 0.2], 1)]
    raise ValueError(f"unknown class {cls}")


def _mask(cls: str, cx: float, cy: float, r: float, rot: float, size: int, rng: np.random.Generator) -> Image.Image:
    polys = _polygon(cls, rng)
    c, s = np.cos(rot), np.sin(rot)
    rmat = np.array([[c, -s], [s, c]])
    masks = []
    for poly in polys:
        pts = (poly @ rmat.T) * r + np.array([cx, cy])
        m = Image.new("L", (size, size), 0)
        ImageDraw.Draw(m).polygon([tuple(p) for p in pts], fill=255)
        masks.append(m)
    mask = masks[0]
    for other in masks[1:]:
        mask = ImageChops.subtract(mask, other)
    return mask


def _pattern(style: str, color: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    base = np.zeros((size, size, 3), np.float32) + np.array(color, np.float32)
    light = base * 0.35 + 255 * 0.65
    yy, xx = np.mgrid[0:size, 0:size]
    period = 4 * SUPERSAMPLE
    phase = int(rng.integers(0, period))
    if style == "striped":
        on = ((xx + yy + phase) // (period // 2)) % 2 == 0
    elif style == "checkered":
        on = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    elif style == "dotted":
        dx = (xx + phase) % period - period / 2
        dy = (yy + phase) % period - period / 2
        on = dx**2 + dy**2 > (period * 0.28) ** 2
    else:
        on = np.ones((size, size), bool)
    out = np.where(on[..., None], base, light)
    return Image.fromarray(out.astype(np.uint8))


def _caption(labels: dict, rng: np.random.Generator) -> str:
    name = labels["class"] if rng.random() < 0.5 else SYNONYMS[labels["class"]][int(rng.integers(0, 3))]
    words = []
    if rng.random() < 0.75:
        words.append(labels["color"])
    if labels["style"] != "plain" and rng.random() < 0.8:
        words.append(labels["style"])
    elif labels["style"] == "plain" and rng.random() < 0.25:
        words.append("plain")
    desc = " ".join([*words, name])
    template = TEMPLATES[int(rng.integers(0, len(TEMPLATES)))]
    article = "an" if desc[0] in "aeiou" else "a"
    return template.format(a=article, desc=desc, bg=labels["background"])


def caption_for(labels: dict, seed: int) -> str:
    """A fresh caption for the same labels (captions are re-drawn each epoch during training)."""
    return _caption(labels, np.random.default_rng(seed))


def render(seed: int, size: int = 32, cls: str | None = None, color: str | None = None, style: str | None = None,
           background: str | None = None) -> Sample:
    """Render one sample; unspecified attributes are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    cls = cls or CLASSES[int(rng.integers(0, len(CLASSES)))]
    color = color or list(COLORS)[int(rng.integers(0, len(COLORS)))]
    style = style or STYLES[int(rng.integers(0, len(STYLES)))]
    background = background or list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    big = size * SUPERSAMPLE
    r = big * rng.uniform(0.27, 0.36)
    cx = big / 2 + rng.uniform(-0.1, 0.1) * big
    cy = big / 2 + rng.uniform(-0.1, 0.1) * big
    rot = np.deg2rad(rng.uniform(-20, 20))
    mask = _mask(cls, cx, cy, r, rot, big, rng)
    if style == "outlined":
        inner = mask.filter(ImageFilter.MinFilter(2 * SUPERSAMPLE + 1))
        mask = ImageChops.subtract(mask, inner)
        fill = _pattern("plain", COLORS[color], big, rng)
    else:
        fill = _pattern(style, COLORS[color], big, rng)
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    canvas.paste(fill, (0, 0), mask)
    image = np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
    labels = {"class": cls, "color": color, "style": style, "background": background,
              "center": [float(cx / big), float(cy / big)], "radius": float(r / big), "rotation": float(rot)}
    return Sample(image=image, labels=labels, caption=_caption(labels, rng))
