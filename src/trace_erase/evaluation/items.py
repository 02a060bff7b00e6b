"""What a suite is made of: the prompt items to draw, the suite itself, an objects suite's class set, and the
per-suite tables (which judgement a scorer must give, the default scorer). Kept apart from :mod:`.suites` so that
the suite builders in their own modules (:mod:`.scene_suite`) share the types without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TraceEraseError

SUITES = ("objects", "celebrities", "styles", "nudity", "coco", "toy-objects", "toy-styles", "toy-scenes")
SCENE_SUITES = ("toy-scenes",)  # two-slot suites: per-slot judgements, metrics of evaluation/scene_metrics.py
# what a scorer must give per image for each suite: a label (classification), a score (CLIP score), counts, or
# slots (a label per slot of a scene: class or empty, colour, style)
NEEDS = {"objects": "label", "toy-objects": "label", "toy-styles": "label", "celebrities": "label",
         "styles": "score", "nudity": "counts", "coco": "score", "toy-scenes": "slots"}
# the scorer a suite uses when none is given (None: the user must name one, by path)
DEFAULT_SCORER = {"toy-objects": "toy", "toy-styles": "toy", "nudity": "nudenet", "toy-scenes": "scene"}


@dataclass(frozen=True)
class PromptItem:
    """One image to generate: its prompt and seed, the group it scores in, and the label a correct image has."""

    prompt: str
    seed: int
    group: str  # "erased" | "synonym" | "other" (scene suites: scene_suite.GROUPS)
    label: str  # expected class / identity / style ("" where the suite has no labels)
    head: str = "class"  # the toy classifier's head that scores it: "class" or "style"
    guidance: float | None = None  # the prompt's own guidance (I2P); None: the sampler's
    # scene suites: (the target's slot, the other object's slot), e.g. ("left", "right"); None: not a scene item
    sides: tuple[str, str] | None = None


@dataclass(frozen=True)
class ClassSet:
    """The classes an objects suite draws from: prompt templates, synonyms, zero-shot text, ImageNet indices."""

    name: str
    classes: dict[str, tuple[str, ...]]
    template: str
    synonym_template: str
    zero_shot: str
    imagenet_index: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source: str = ""  # how it was named: a bundled set's name or the JSON file's path
    compositions: bool = False  # add the "composed" group (attribute compositions; the toy world's)

    def class_of(self, concept: str) -> str:
        """The class a concept names (the class or one of its synonyms), case-insensitively."""
        c = concept.strip().lower()
        for cls, syns in self.classes.items():
            if c == cls.lower() or c in (s.lower() for s in syns):
                return cls
        raise TraceEraseError(f"'{concept}' is not a class of the {self.name} class set; choose one of "
                              f"{', '.join(self.classes)}")


@dataclass(frozen=True)
class Suite:
    """A suite's items for one erased concept, the label set a classifier chooses among and where it came from."""

    name: str
    concept: str
    items: list[PromptItem]
    labels: tuple[str, ...] = ()  # candidate labels (classification suites)
    zero_shot: dict[str, str] = field(default_factory=dict)  # label → text a CLIP zero-shot scorer compares with
    class_set: ClassSet | None = None
    source: str = "built-in"  # "built-in" or the prompts file

    @property
    def needs(self) -> str:
        """What a scorer must give per image: "label", "score" or "counts"."""
        return NEEDS[self.name]

    def describe(self) -> dict[str, object]:
        """The suite's identity for results.json."""
        return {"name": self.name, "concept": self.concept, "source": self.source, "items": len(self.items),
                "labels": list(self.labels), "class_set": self.class_set.source if self.class_set else None}


def article(word: str) -> str:
    """'a' or 'an' before ``word``."""
    return "an" if word[:1].lower() in "aeiou" else "a"
