"""Prompt suites: the toy world's object and style suites (prompts, groups, expected labels, seeds)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TraceEraseError
from ..toyworld.render import CLASSES, STYLES, SYNONYMS

SUITES = ("toy-objects", "toy-styles")


@dataclass(frozen=True)
class PromptItem:
    """One image to generate: its prompt and seed, the group it scores in, and the label a correct image has."""

    prompt: str
    seed: int
    group: str  # "erased" | "synonym" | "other"
    label: str  # expected class (objects) or style (styles)
    head: str  # classifier head that scores it: "class" or "style"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def toy_class_of(concept: str) -> str:
    """The toy class a concept names (a class or one of its synonyms)."""
    c = concept.strip().lower()
    for cls in CLASSES:
        if c == cls or c in SYNONYMS[cls]:
            return cls
    raise TraceEraseError(f"'{concept}' is not a toy object class; choose one of {', '.join(CLASSES)}")


def toy_objects(concept: str, seeds: int) -> list[PromptItem]:
    """MACE-style object suite: the erased class, its 3 synonyms (generality) and the 9 other classes."""
    cls = toy_class_of(concept)
    items = [PromptItem(f"a photo of a {cls}", s, "erased", cls, "class") for s in range(seeds)]
    for syn in SYNONYMS[cls]:
        items += [PromptItem(f"a photo of {_article(syn)} {syn}", s, "synonym", cls, "class") for s in range(seeds)]
    for other in CLASSES:
        if other != cls:
            items += [PromptItem(f"a photo of a {other}", s, "other", other, "class") for s in range(seeds)]
    return items


def toy_styles(concept: str, seeds: int) -> list[PromptItem]:
    """Style suite: the erased style on every class, and the other styles (scored by the style head)."""
    style = concept.strip().lower()
    if style not in STYLES[1:]:
        raise TraceEraseError(f"'{concept}' is not a toy style; choose one of {', '.join(STYLES[1:])}")
    items = []
    for st in STYLES[1:]:
        group = "erased" if st == style else "other"
        items += [PromptItem(f"{_article(st)} {st} {CLASSES[s % len(CLASSES)]}", s, group, st, "style")
                  for s in range(seeds)]
    return items


def build_suite(name: str, concept: str, seeds: int) -> list[PromptItem]:
    """The items of suite ``name`` for erased ``concept``."""
    if name == "toy-objects":
        return toy_objects(concept, seeds)
    if name == "toy-styles":
        return toy_styles(concept, seeds)
    raise TraceEraseError(f"unknown suite '{name}'; available: {', '.join(SUITES)}")
