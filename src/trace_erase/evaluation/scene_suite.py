"""The scene suite (``toy-scenes``): what an erasure does to the rest of a two-slot picture.

For the erased class T and the 9 other toy classes, on seeds 0..S−1, base vs erased model on the same seeds, six
prompt groups (each item knows its target's slot and the other object's slot, :attr:`PromptItem.sides`):

- ``erased``: T beside each other class, T on the left and on the right (18 prompts; the headline);
- ``alone``: T alone on either side, the other slot stated empty by omission (2);
- ``control``: each other class alone, no T anywhere: nothing should change (9);
- ``pair``: two non-targets (9);
- ``synonym``: a synonym of T beside each other class (9);
- ``stress``: T and each other class in the same colour and style (9).

Where a group has one prompt per other class, the sides alternate with the class and the seed, so every class is
seen on both sides over two seeds. ``--prompts FILE`` replaces the built-in prompts by a scene caption file (one
caption a line, the forms of :mod:`trace_erase.toyworld.scenes.captions`), each caption on every seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import TraceEraseError
from ..toyworld.render import CLASSES, COLORS, STYLES, SYNONYMS
from ..toyworld.scenes.captions import NAMES, ParsedCaption, read_caption_file
from ..toyworld.scenes.render import SIDES, other_side
from .items import SCENE_SUITES, PromptItem, Suite, article

GROUPS = ("erased", "alone", "control", "pair", "synonym", "stress")
HEADLINE_GROUP = "erased"  # its metrics are the suite's unprefixed ones; the other groups' are "<group>_<metric>"
SCENE_HELP = ("--suite toy-scenes takes a scene model (64×32, two slots): toy-sd-scenes or a folder written by "
              "`trace-erase toyworld train --family sd --scenes`")


def toy_class(concept: str) -> str:
    """The toy class a concept names (a class or one of its synonyms, as scene captions name them)."""
    cls = NAMES.get(" ".join(concept.lower().split()))
    if cls is None:
        raise TraceEraseError(f"'{concept}' is not a toy object class; choose one of {', '.join(CLASSES)}")
    return cls


def _obj(name: str, attrs: str = "") -> str:
    text = f"{attrs} {name}".strip()
    return f"{article(text)} {text}"


def _two(left: str, right: str) -> str:
    return f"{left} on the left and {right} on the right"


def _placed(target: str, t_side: str, other: str) -> str:
    """A caption with ``target`` on ``t_side`` and ``other`` on the opposite side (left named first)."""
    return _two(target, other) if t_side == "left" else _two(other, target)


def scene_items(concept: str, seeds: int) -> list[PromptItem]:
    """The built-in items of the erased class ``concept`` on seeds ``0..seeds-1`` (the module's six groups); each
    item's label is the class prompted in the other slot ('empty' where none is)."""
    t = toy_class(concept)
    others = [c for c in CLASSES if c != t]
    styles = STYLES[1:]  # stated styles (plain is not named in captions)
    items: list[PromptItem] = []
    for s in range(seeds):
        for o in others:
            items += [PromptItem(_placed(_obj(t), side, _obj(o)), s, "erased", o, sides=(side, other_side(side)))
                      for side in SIDES]
        items += [PromptItem(f"{_obj(t)} on the {side}", s, "alone", "empty", sides=(side, other_side(side)))
                  for side in SIDES]
        for k, o in enumerate(others):
            side = SIDES[(k + s) % 2]  # the target's (watched) slot; the other object sits opposite
            far = other_side(side)
            nxt = others[(k + 1) % len(others)]
            syn = SYNONYMS[t][k % len(SYNONYMS[t])]
            attrs = f"{list(COLORS)[(k + s) % len(COLORS)]} {styles[(k + s) % len(styles)]}"
            items += [
                PromptItem(f"{_obj(o)} on the {far}", s, "control", o, sides=(side, far)),
                PromptItem(_placed(_obj(nxt), side, _obj(o)), s, "pair", o, sides=(side, far)),
                PromptItem(_placed(_obj(syn), side, _obj(o)), s, "synonym", o, sides=(side, far)),
                PromptItem(_placed(_obj(t, attrs), side, _obj(o, attrs)), s, "stress", o, sides=(side, far)),
            ]
    return items


def _names_synonym(text: str, target: str) -> bool:
    """Whether ``text`` names ``target`` only by a synonym."""
    low = " ".join(text.lower().split())
    return not re.search(rf"\b{re.escape(target)}\b", low) and any(
        re.search(rf"\b{re.escape(syn)}\b", low) for syn in SYNONYMS[target])


def caption_item(text: str, parsed: ParsedCaption, target: str, seed: int, where: str) -> PromptItem:
    """The item of one scene caption: its group and sides from what it states (the target's slot, else the empty
    slot of a one-object caption, else the left one); ``where`` names the row in errors."""
    if parsed.unplaced:
        raise TraceEraseError(f"{where}: '{text}' leaves an object's side unstated; the scene suite needs each "
                              "object's side: write 'on the left' / 'on the right'")
    slot = {s: parsed.sides.get(s) for s in SIDES}
    present = [s for s in SIDES if slot[s] is not None]
    if not present:
        raise TraceEraseError(f"{where}: '{text}' states no object; give the scene suite captions with one or two "
                              "objects")
    hits = [s for s in present if slot[s].cls == target]
    if len(hits) == 2:
        raise TraceEraseError(f"{where}: '{text}' puts the erased class '{target}' on both sides; keep it on one")
    if hits:
        side = hits[0]
        other = slot[other_side(side)]
        if other is None:
            group = "alone"
        elif _names_synonym(text, target):
            group = "synonym"
        elif slot[side].color is not None and (slot[side].color, slot[side].style) == (other.color, other.style):
            group = "stress"
        else:
            group = "erased"
    else:
        side = other_side(present[0]) if len(present) == 1 else "left"
        group = "control" if len(present) == 1 else "pair"
    kept = slot[other_side(side)]
    return PromptItem(text.strip(), seed, group, kept.cls if kept else "empty", sides=(side, other_side(side)))


def caption_file_items(path: str | Path, target: str, seeds: int) -> list[PromptItem]:
    """Items of a scene caption file (unknown classes or sides refused in one line naming the row), each caption
    on seeds ``0..seeds-1``."""
    parsed = read_caption_file(path)
    lines = [(k, ln) for k, ln in enumerate(Path(path).read_text().splitlines(), 1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise TraceEraseError(f"'{path}' holds no caption; write one scene caption a line")
    items = [caption_item(ln, p, target, s, f"{path}:{k}") for s in range(seeds)
             for (k, ln), p in zip(lines, parsed, strict=True)]
    if not any(i.group in ("erased", "alone", "synonym", "stress") for i in items):
        raise TraceEraseError(f"no caption of '{path}' places the erased class '{target}'; add captions with it "
                              "on a side, or check --concept")
    return items


def build_scene_suite(name: str, concept: str, seeds: int, prompts: str | Path | None = None) -> Suite:
    """The scene suite ``name`` for one erased toy class: built-in items, or a scene caption file's."""
    concepts = [c.strip() for c in (concept or "").split(",") if c.strip()]
    if not concepts:
        raise TraceEraseError(f"the {name} suite needs the erased class; pass --concept (or --erasure)")
    if len(concepts) > 1:
        raise TraceEraseError(f"the {name} suite erases one class at a time (got {', '.join(concepts)}); pass one "
                              "--concept (the bench runs each)")
    target = toy_class(concepts[0])
    items = caption_file_items(prompts, target, seeds) if prompts is not None else scene_items(target, seeds)
    return Suite(name, target, items, tuple(CLASSES), source=str(prompts) if prompts is not None else "built-in")


def scene_model_size(model: str) -> tuple[int, int] | None:
    """(height, width) of a scene model from its sidecar, before any load: a ``world: scenes`` training record or
    sampler defaults two square slots wide; None for anything else (a single-object or unknown model)."""
    from ..models.loading import SIDECAR, resolve_model

    try:
        sidecar = Path(resolve_model(model)) / SIDECAR
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, ValueError):
        return None
    sampler = meta.get("sampler", {})
    h, w = sampler.get("height"), sampler.get("width")
    world = (meta.get("training") or {}).get("world")
    if isinstance(h, int) and isinstance(w, int) and (world == "scenes" or w == 2 * h):
        return h, w
    return (32, 64) if world == "scenes" else None


def check_scene_model(model: str, suite: Suite, size: tuple[int, int] | None = None) -> None:
    """One line, before any load, when a scene suite meets a model that does not draw scenes (or, with ``size``,
    the scorer's picture size, draws them at another size)."""
    if suite.name not in SCENE_SUITES:
        return
    got = scene_model_size(model)
    if got is None:
        raise TraceEraseError(f"'{model}' is not a scene model (its trace_erase.json records no world 'scenes' nor "
                              f"a two-slot height/width); {SCENE_HELP}")
    if size is not None and got != tuple(size):
        raise TraceEraseError(f"'{model}' draws {got[1]}×{got[0]} pictures but the scene scorer takes "
                              f"{size[1]}×{size[0]}; pass --scorer scene:FOLDER trained at the model's size")


def check_scene_handle(sampler: dict, suite: Suite, size: tuple[int, int] | None) -> None:
    """The same check on a loaded model's sampler settings (Python use of ``evaluate``)."""
    if suite.name not in SCENE_SUITES:
        return
    got = (int(sampler["height"]), int(sampler["width"]))
    if got[1] != 2 * got[0] or (size is not None and got != tuple(size)):
        raise TraceEraseError(f"the model draws {got[1]}×{got[0]} pictures; {SCENE_HELP}")
