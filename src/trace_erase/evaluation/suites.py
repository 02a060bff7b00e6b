"""Prompt suites: which images an evaluation draws (prompt, seed, group, expected label) and which question the
scorer answers about them.

Suites and what they measure (formulas in :mod:`.metrics`):

- ``objects``: MACE's object protocol. The erased class, its synonyms (generality) and the other classes of a class
  set (``cifar10`` by default, ``imagenette``, ``toy``, or a JSON file of the same shape); Acc_e / Acc_s / Acc_g, H_o.
- ``celebrities``: erased vs retained names × 5 templates; top-1 identity; Acc_e / Acc_s, H_c.
- ``styles``: erased vs retained artists × 5 templates; CLIP score of each image against its prompt; CLIP_e /
  CLIP_s, H_a.
- ``nudity``: a prompt file (I2P: each prompt with its own seed and guidance); NudeNet exposed-part counts.
- ``coco``: a captions file; FID against ``--reference`` images and CLIP score.
- ``toy-objects`` / ``toy-styles``: the toy world's (``objects`` with the ``toy`` class set; the style head).
- ``toy-scenes``: two-slot scenes (:mod:`.scene_suite`): the erased class beside other objects, per-slot judgements;
  Acc_e, what its slot became, the other object's retention and layout, H_scene.

Every suite also reads ``--prompts FILE`` (:mod:`.prompts_files`): a labelled suite takes each row's label column
to place it (erased / synonym / other); a file decides its images exactly, one per row.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import TraceEraseError
from ..toyworld.render import CLASSES, STYLES, SYNONYMS
from .items import NEEDS, SCENE_SUITES, SUITES, ClassSet, PromptItem, Suite, article
from .prompts_files import LABEL_COLUMNS, PromptRecord, read_prompts

# PromptItem, Suite, ClassSet and the per-suite tables live in .items (shared with suites in their own modules,
# e.g. .scene_suite) and are imported from here as before
CLASS_SETS = ("cifar10", "imagenette", "toy")


def fill(template: str, word: str) -> str:
    """``template`` with ``{}`` replaced by ``word`` and ``{a}`` by its article."""
    return template.replace("{a}", article(word)).replace("{}", word)


def _data(name: str) -> dict:
    return json.loads(resources.files("trace_erase.evaluation").joinpath("data", f"{name}.json").read_text())


def load_class_set(spec: str | None = "cifar10") -> ClassSet:
    """A bundled class set (``cifar10``, ``imagenette``, ``toy``) or a JSON file with ``classes`` (name → synonyms)
    and optional ``template``, ``zero_shot`` and ``imagenet_index``."""
    spec = spec or "cifar10"
    if spec == "toy":  # the toy world's classes through the same code path (its prompts as the toy suite had them)
        return ClassSet("toy", {c: tuple(SYNONYMS[c]) for c in CLASSES}, "a photo of a {}", "a photo of {a} {}",
                        "a photo of a {}", source="toy", compositions=True)
    if spec in CLASS_SETS:
        data = _data(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise TraceEraseError(f"--classes '{spec}' is neither a bundled class set ({', '.join(CLASS_SETS)}) "
                                  "nor a JSON file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TraceEraseError(f"'{path}' is not valid JSON ({exc.msg}); a class set is "
                                  '{"classes": {"name": ["synonym", ...]}}') from exc
        if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) or not data["classes"]:
            raise TraceEraseError(f"'{path}' lacks 'classes' (a class set is "
                                  '{"classes": {"name": ["synonym", ...]}, "template": "a photo of the {}"})')
    template = data.get("template", "a photo of the {}")
    return ClassSet(data.get("name", str(spec)), {k: tuple(v) for k, v in data["classes"].items()}, template,
                    data.get("synonym_template", template), data.get("zero_shot", template),
                    {k: tuple(v) for k, v in data.get("imagenet_index", {}).items()},
                    spec if spec in CLASS_SETS else str(Path(spec).resolve()))


def toy_split(name: str, kind: str = "classes") -> tuple[str, ...]:
    """The toy world's fixed development / test halves: a ``random.Random(0)`` shuffle, cut in two. Classes (dev:
    square, star, heart, arrow, diamond; test: circle, triangle, cross, crescent, house) or, with ``kind="styles"``,
    the four erasable styles (plain is the anchor), two each way. Defaults are chosen on ``dev`` only; tables report
    ``test`` (and all)."""
    import random

    items = list(CLASSES) if kind == "classes" else list(STYLES[1:])
    order = list(items)
    random.Random(0).shuffle(order)
    half = order[: len(order) // 2] if name == "dev" else order[len(order) // 2:]
    return tuple(c for c in items if c in half)


def toy_class_of(concept: str) -> str:
    """The toy class a concept names (a class or one of its synonyms)."""
    try:
        return load_class_set("toy").class_of(concept)
    except TraceEraseError:
        raise TraceEraseError(f"'{concept}' is not a toy object class; choose one of {', '.join(CLASSES)}") from None


# the "composed" group: the class or a synonym inside colour / style / background compositions, in templates that
# neither stage A's augmentations nor the suite's own prompts use (ours; the toy captions' vocabulary)
COMPOSITIONS = ("{a} {color} {style} {name} on a {bg} background", "a simple {color} {name}",
                "{a} {style} {name} in the middle", "a {color} {name} on a {bg} background")


def composed(cls: str, synonyms: tuple[str, ...], seed: int) -> list[str]:
    """The composed prompts of ``cls`` for ``seed``: each template once, names and attributes varying with both."""
    from ..toyworld.render import BACKGROUNDS, COLORS

    names, colors, backgrounds = (cls, *synonyms), list(COLORS), [b for b in BACKGROUNDS if b != "white"]
    out = []
    for k, template in enumerate(COMPOSITIONS):
        name = names[(seed + k) % len(names)]
        words = {"color": colors[(seed + 2 * k) % len(colors)], "style": STYLES[1 + (seed + k) % (len(STYLES) - 1)],
                 "bg": backgrounds[(seed + k) % len(backgrounds)], "name": name}
        text = template.replace("{a} ", "").format(**words)
        out.append(f"{article(text)} {text}" if template.startswith("{a}") else text)
    return out


def _objects(concept: str, seeds: int, cs: ClassSet) -> list[PromptItem]:
    cls = cs.class_of(concept)
    items = [PromptItem(fill(cs.template, cls), s, "erased", cls) for s in range(seeds)]
    for syn in cs.classes[cls]:
        items += [PromptItem(fill(cs.synonym_template, syn), s, "synonym", cls) for s in range(seeds)]
    if cs.compositions:
        items += [PromptItem(p, s, "composed", cls) for s in range(seeds) for p in composed(cls, cs.classes[cls], s)]
    for other in cs.classes:
        if other != cls:
            items += [PromptItem(fill(cs.template, other), s, "other", other) for s in range(seeds)]
    return items


def _names(concepts: list[str], seeds: int, name: str, retained: list[str] | None) -> list[PromptItem]:
    """Celebrities / styles: every template for each erased and each retained name."""
    data = _data(name)
    erased = {c.lower() for c in concepts}
    kept = retained if retained is not None else [n for n in data["names"] if n.lower() not in erased]
    if not kept:
        raise TraceEraseError(f"the {name} suite needs at least one retained name; pass --retained NAMES")
    items = []
    for group, names in (("erased", concepts), ("other", kept)):
        for who in names:
            items += [PromptItem(t.format(who), s, group, who) for t in data["templates"] for s in range(seeds)]
    return items


def _toy_styles(concepts: list[str], seeds: int) -> list[PromptItem]:
    erased = [c.strip().lower() for c in concepts]
    for style in erased:
        if style not in STYLES[1:]:
            raise TraceEraseError(f"'{style}' is not a toy style; choose one of {', '.join(STYLES[1:])}")
    items = []
    for st in STYLES[1:]:
        group = "erased" if st in erased else "other"
        items += [PromptItem(f"{article(st)} {st} {CLASSES[s % len(CLASSES)]}", s, group, st, "style")
                  for s in range(seeds)]
    return items


def _from_file(name: str, concepts: list[str], records: list[PromptRecord], path: str,
               cs: ClassSet | None) -> list[PromptItem]:
    """Items of a prompts file: one image per row at the row's seed (its index when it has none)."""
    items = []
    labelled = NEEDS[name] == "label" or name == "styles"
    if labelled and records[0].label_column is None:
        raise TraceEraseError(f"'{path}' has no label column ({', '.join(LABEL_COLUMNS)}), which the {name} suite "
                              "needs to tell erased from retained prompts; add one, or use --suite coco/nudity")
    erased = {c.lower() for c in concepts}
    for k, r in enumerate(records):
        seed = r.seed if r.seed is not None else k
        head = "style" if name == "toy-styles" else "class"
        if not labelled:
            group = "erased" if name == "nudity" else "other"
            items.append(PromptItem(r.prompt, seed, group, "", head, r.guidance))
            continue
        label = (r.label or "").strip()
        group = "erased" if label.lower() in erased else "other"
        if cs is not None:
            try:
                cls = cs.class_of(label)
            except TraceEraseError:
                raise TraceEraseError(f"'{path}' row {k + 2}: label '{label}' is not a class of the {cs.name} class "
                                      "set; fix the row or pass --classes FILE") from None
            group = "erased" if cls.lower() in erased else "other"
            if group == "erased" and label.lower() != cls.lower():
                group = "synonym"
            label = cls
        items.append(PromptItem(r.prompt, seed, group, label, head, r.guidance))
    if labelled and not any(i.group == "erased" for i in items):
        raise TraceEraseError(f"no row of '{path}' is labelled with the erased concept ({', '.join(concepts)}); "
                              "check the label column or --concept")
    return items


def build_suite(name: str, concept: str, seeds: int = 10, prompts: str | Path | None = None,
                classes: str | None = None, retained: list[str] | None = None) -> Suite:
    """The suite ``name`` for the erased ``concept`` (comma-separated for several): built-in prompts × ``seeds``, or
    the rows of a ``prompts`` file. ``classes`` picks the objects suite's class set; ``retained`` replaces the
    celebrities/styles suites' retained names."""
    if name not in SUITES:
        raise TraceEraseError(f"unknown suite '{name}'; available: {', '.join(SUITES)}")
    if seeds < 1:
        raise TraceEraseError(f"--seeds must be at least 1 (got {seeds})")
    if classes is not None and name != "objects":
        raise TraceEraseError(f"--classes applies to --suite objects, not {name}")
    if retained is not None and name not in ("celebrities", "styles"):
        raise TraceEraseError(f"--retained applies to --suite celebrities or styles, not {name}")
    if name in SCENE_SUITES:
        from .scene_suite import build_scene_suite

        return build_scene_suite(name, concept, seeds, prompts)
    if name in ("nudity", "coco") and prompts is None:
        what = "an I2P CSV (prompt, evaluation_seed, ...)" if name == "nudity" else "a captions file (COCO JSON, CSV)"
        raise TraceEraseError(f"--suite {name} needs --prompts FILE: {what}")
    concepts = [c.strip() for c in concept.split(",") if c.strip()] if concept else []
    if not concepts and name not in ("nudity", "coco"):
        raise TraceEraseError(f"the {name} suite needs the erased concept; pass --concept (or --erasure)")
    cs = load_class_set("toy" if name == "toy-objects" else classes) if name in ("objects", "toy-objects") else None
    if cs is not None:
        concepts = [cs.class_of(c) for c in concepts]
    if prompts is not None:
        items = _from_file(name, concepts, read_prompts(prompts), str(prompts), cs)
    elif cs is not None:
        items = [i for c in concepts for i in _objects(c, seeds, cs)]
        if len(concepts) > 1:  # several erased classes: none of them is "other"
            items = [i for i in items if not (i.group == "other" and i.label in concepts)]
    elif name == "toy-styles":
        items = _toy_styles(concepts, seeds)
    else:
        items = _names(concepts, seeds, name, retained)
    if name == "toy-styles":
        labels: tuple[str, ...] = STYLES
    elif cs is not None:
        labels = tuple(cs.classes)
    elif name in ("celebrities", "styles"):
        labels = tuple(dict.fromkeys(i.label for i in items))
    else:
        labels = ()
    zero_shot = {lab: fill(cs.zero_shot, lab) for lab in labels} if cs is not None else {}
    return Suite(name, ",".join(concepts) if concepts else (concept or ""), items, labels, zero_shot, cs,
                 str(prompts) if prompts is not None else "built-in")
