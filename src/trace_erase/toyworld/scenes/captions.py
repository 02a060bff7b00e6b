"""Captions of two-slot scenes, and a parser that recovers what a caption states.

Forms (names may be any synonym of the class, as in :data:`trace_erase.toyworld.render.SYNONYMS`):
full with sides in either order ("a red striped star on the left and a blue house on the right, on a black
background"), with or without the background; classes with sides ("a star on the left and a house on the right");
partial, sides unstated ("a star and a house"); single objects ("a star on the left", "a star on the left and nothing
on the right", "a star"); and empty pictures ("an empty picture on a gray background").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np

from ...errors import TraceEraseError
from ..render import BACKGROUNDS, CLASSES, COLORS, STYLES, SYNONYMS
from ..render import vocabulary as object_vocabulary
from .render import SIDES, Scene, SlotObject

NAMES: dict[str, str] = {name: cls for cls in CLASSES for name in (cls, *SYNONYMS[cls])}  # any name → its class
_NAMES_LONGEST_FIRST = sorted(NAMES, key=lambda n: -len(n.split()))
_SIDE_RE = re.compile(r"^(.*?)\s*\b(on|to|at|in) the (\w+)$")
_BG_RE = re.compile(r"^(.*?),?\s*\bon an? (\w+) background$")
EMPTY_PICTURE = "an empty picture"
FIX = "use the toy classes or their synonyms, the sides left/right, and the forms in toyworld/scenes/captions.py"


def _article(text: str) -> str:
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def _desc(obj: SlotObject, name: str, attrs: bool, say_plain: bool = False) -> str:
    words = [obj.color, obj.style] if attrs and (obj.style != "plain" or say_plain) else [obj.color] if attrs else []
    return _article(" ".join([*words, name]))


def caption_forms(scene: Scene, names: dict[str, str] | None = None) -> list[str]:
    """Every caption form of ``scene``; ``names`` maps a side to the name used for its class (default: the class)."""
    names = names or {}
    bg = f", on {_article(scene.background)} background"
    objs = {s: scene.slot(s) for s in SIDES}
    name = {s: names.get(s, objs[s].cls) for s in SIDES if objs[s] is not None}
    full = {s: _desc(objs[s], name[s], True) for s in name}
    short = {s: _desc(objs[s], name[s], False) for s in name}
    if not name:
        return [f"nothing on the left and nothing on the right{bg}", f"{EMPTY_PICTURE}{bg}"]
    if len(name) == 1:
        (s,) = name
        o = "right" if s == "left" else "left"
        return [f"{full[s]} on the {s}{bg}", f"{full[s]} on the {s}", f"{short[s]} on the {s}",
                f"{full[s]} on the {s} and nothing on the {o}{bg}", f"nothing on the {o} and {short[s]} on the {s}",
                f"{full[s]}{bg}", short[s]]
    out = []
    for a, b in (("left", "right"), ("right", "left")):
        out += [f"{full[a]} on the {a} and {full[b]} on the {b}{bg}", f"{full[a]} on the {a} and {full[b]} on the {b}",
                f"{short[a]} on the {a} and {short[b]} on the {b}", f"{short[a]} and {short[b]}",
                f"{full[a]} and {full[b]}{bg}"]
    if any(o.style == "plain" for o in scene.objects()):
        plain = {s: _desc(objs[s], name[s], True, say_plain=True) for s in name}
        out.append(f"{plain['left']} on the left and {plain['right']} on the right{bg}")
    return out


def all_captions(scene: Scene) -> list[str]:
    """Every form with every name: the class, then each synonym in turn (the same synonym index on both sides)."""
    out: list[str] = []
    for k in range(4):
        names = {s: (o.cls, *SYNONYMS[o.cls])[k] for s in SIDES if (o := scene.slot(s)) is not None}
        out += [c for c in caption_forms(scene, names) if c not in out]
    return out


def caption_for(scene: Scene, seed: int) -> str:
    """One caption drawn from ``seed`` (a random form; each side's name is the class or a synonym, at random)."""
    rng = np.random.default_rng([int(seed), 2])
    names = {s: (o.cls, *SYNONYMS[o.cls])[int(rng.integers(4))] for s in SIDES if (o := scene.slot(s)) is not None}
    forms = caption_forms(scene, names)
    return forms[int(rng.integers(len(forms)))]


@dataclass(frozen=True)
class ParsedObject:
    """An object a caption states: its class, and its colour and style when stated (else ``None``)."""

    cls: str
    color: str | None = None
    style: str | None = None

    def matches(self, obj: SlotObject | None) -> bool:
        """Whether ``obj`` has this class and every stated attribute."""
        return obj is not None and obj.cls == self.cls and self.color in (None, obj.color) \
            and self.style in (None, obj.style)


@dataclass
class ParsedCaption:
    """What a caption states. ``sides``: the sides it places, each an object or ``None`` (stated empty);
    ``unplaced``: objects whose side is unstated; ``background``: stated background or ``None``."""

    sides: dict[str, ParsedObject | None] = field(default_factory=dict)
    unplaced: tuple[ParsedObject, ...] = ()
    background: str | None = None

    def consistent_with(self, scene: Scene) -> bool:
        """Whether ``scene`` shows everything the caption states (unstated things may be anything)."""
        if self.background not in (None, scene.background):
            return False
        for side, stated in self.sides.items():
            obj = scene.slot(side)
            if (obj is not None) if stated is None else not stated.matches(obj):
                return False
        free = [scene.slot(s) for s in SIDES if s not in self.sides and scene.slot(s) is not None]
        if len(self.unplaced) > len(free):
            return False
        return any(all(p.matches(o) for p, o in zip(self.unplaced, perm, strict=False))
                   for perm in permutations(free, len(self.unplaced)))


def _parse_object(body: str, text: str) -> ParsedObject:
    words = body.split()
    if words[:1] in (["a"], ["an"], ["one"]):
        words = words[1:]
    phrase = " ".join(words)
    name = next((n for n in _NAMES_LONGEST_FIRST if phrase == n or phrase.endswith(" " + n)), None)
    if name is None:
        rest = [w for w in words if w not in COLORS and w not in STYLES] or words or [body]
        raise TraceEraseError(f"unknown class '{' '.join(rest)}' in scene caption '{text}'; {FIX}")
    color = style = None
    for w in words[: len(words) - len(name.split())]:
        if w in COLORS and color is None:
            color = w
        elif w in STYLES and style is None:
            style = w
        else:
            raise TraceEraseError(f"unknown or repeated word '{w}' before '{name}' in scene caption '{text}'; {FIX}")
    return ParsedObject(NAMES[name], color, style)


def parse_caption(text: str) -> ParsedCaption:
    """What ``text`` states per side (class, colour, style), its background, and objects with no side."""
    norm = " ".join(text.lower().replace(".", " ").split())
    out = ParsedCaption()
    if m := _BG_RE.match(norm):
        norm, bg = m.group(1).strip(), m.group(2)
        if bg not in BACKGROUNDS:
            raise TraceEraseError(f"unknown background '{bg}' in scene caption '{text}'; "
                                  f"use one of {', '.join(BACKGROUNDS)}")
        out.background = bg
    if norm in (EMPTY_PICTURE, "empty picture"):
        out.sides = {s: None for s in SIDES}
        return out
    if not norm:
        raise TraceEraseError(f"scene caption '{text}' states no object; {FIX}")
    unplaced = []
    for clause in norm.replace(",", " ").split(" and "):
        clause = clause.strip()
        side = None
        if m := _SIDE_RE.match(clause):
            clause, side = m.group(1).strip(), m.group(3)
            if side not in SIDES:
                raise TraceEraseError(f"unknown side '{side}' in scene caption '{text}'; use 'on the left' or "
                                      f"'on the right'")
            if side in out.sides:
                raise TraceEraseError(f"scene caption '{text}' states the {side} side twice; state each side once")
        if clause == "nothing":
            if side is None:
                raise TraceEraseError(f"'nothing' without a side in scene caption '{text}'; write 'nothing on the "
                                      f"left' or 'nothing on the right'")
            out.sides[side] = None
            continue
        obj = _parse_object(clause, text)
        if side is None:
            unplaced.append(obj)
        else:
            out.sides[side] = obj
    if len(out.sides) + len(unplaced) > len(SIDES):
        raise TraceEraseError(f"scene caption '{text}' states more than two objects; a scene has two slots")
    out.unplaced = tuple(unplaced)
    return out


def read_caption_file(path: str | Path) -> list[ParsedCaption]:
    """Parse a scene caption file: one caption a line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise TraceEraseError(f"no scene caption file at '{path}'; pass a text file with one caption a line")
    out = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                out.append(parse_caption(line))
            except TraceEraseError as e:
                raise TraceEraseError(f"{path}:{k}: {e}") from None
    return out


def vocabulary() -> list[str]:
    """Every word scene captions use (a superset of the single-object :func:`render.vocabulary`)."""
    words = set(object_vocabulary())
    for name in NAMES:
        words.update(name.split())
    words.update(["a", "an", "on", "the", "and", "nothing", "empty", "picture", "background", *SIDES, *COLORS,
                  *STYLES, *BACKGROUNDS])
    return sorted(words)
