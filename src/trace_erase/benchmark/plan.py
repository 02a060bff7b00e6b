"""A bench's plan, checked before a model loads: which methods (on this family, with this scheduler and sweep),
which concepts (a list, ``all`` or a toy half), and for the many-concepts protocol which concept counts."""

from __future__ import annotations

from typing import Any

from ..api import method_configs
from ..errors import TraceEraseError
from ..evaluation.suites import load_class_set, toy_split
from ..methods import get_method
from ..models.loading import peek_family
from ..runtime import Runtime
from ..sampling import check_scheduler
from ..toyworld.render import STYLES
from .bench import parse_sweep
from .many_concepts import concept_sets, parse_counts, singleton_rows


def check_methods(model: str, methods: str, runtime: Runtime, scheduler: str | None = None,
                  sweep: str | None = None) -> list[str]:
    """The method names of a comma list, each checked against the model's family; the scheduler and the runtime's
    ability to train (where a method or the sweep trains); each sweep run's configs built now."""
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    family = peek_family(model)
    for m in method_list:
        get_method(m).check_family(family)
    check_scheduler(scheduler, family)
    if any(get_method(m).uses_trajectory for m in method_list) or sweep:
        runtime.check_training()
    for extra in parse_sweep(sweep):
        method_configs(get_method("trace"), extra, family)
    return method_list


def resolve_concepts(concepts: str, suite: str, classes: str | None = None) -> list[str]:
    """``dev``/``test`` (the toy classes' halves; for toy-styles the styles' halves), ``all`` (every class of an
    objects suite, every toy style), or a comma list."""
    if concepts in ("dev", "test"):
        if suite == "toy-styles":
            return list(toy_split(concepts, "styles"))
        if suite not in ("toy-objects", "toy-scenes") and not (suite == "objects" and classes == "toy"):
            raise TraceEraseError(f"--concepts {concepts} is the toy world's split; use it with --suite toy-objects, "
                                  "toy-scenes or toy-styles")
        return list(toy_split(concepts))
    if concepts == "all":
        if suite in ("objects", "toy-objects", "toy-scenes"):
            return list(load_class_set(classes if suite == "objects" else "toy").classes)
        if suite == "toy-styles":
            return list(STYLES[1:])
        raise TraceEraseError(f"--concepts all is defined for the objects suites; name the concepts to erase "
                              f"for --suite {suite} (e.g. --concepts nudity)")
    return [c.strip() for c in concepts.split(",") if c.strip()]


def check_concept_counts(concept_counts: str | None, suite: str, prompts: str | None, subsets: int,
                         singletons: str | None, model: str, seeds: int, options: dict[str, Any],
                         attacks: bool, pool: list[str] | None = None,
                         preserve_retained: bool = False) -> list[int] | None:
    """The many-concepts protocol's counts (None: not asked for), checked with everything it combines with;
    ``pool``: the classes its sets are drawn from (None: all)."""
    if concept_counts is None:
        if singletons:
            raise TraceEraseError("--singletons supplies --concept-counts' N = 1 runs; add --concept-counts 1,2,5,8 "
                                  "or drop it")
        if preserve_retained:
            raise TraceEraseError("--preserve-retained names each concept set's retained classes; add "
                                  "--concept-counts 2,5 or drop it")
        return None
    if singletons and preserve_retained:
        raise TraceEraseError("--singletons runs were made without --preserve-retained; drop one of them (N = 1 "
                              "then runs here with the other classes preserved)")
    if attacks:
        raise TraceEraseError("--attacks attacks one erased concept at a time; it does not combine with "
                              "--concept-counts")
    counts = parse_counts(concept_counts)
    if singletons and 1 not in counts:
        raise TraceEraseError(f"--singletons supplies the N = 1 runs, and --concept-counts {concept_counts} has no "
                              "N = 1; add 1 to --concept-counts or drop --singletons")
    if suite != "toy-objects" or prompts:
        raise TraceEraseError("--concept-counts runs on --suite toy-objects with its built-in prompts")
    if subsets < 1:
        raise TraceEraseError(f"--subsets must be ≥ 1 (got {subsets})")
    concept_sets(list(pool or load_class_set("toy").classes), counts, subsets)  # too many subsets: refused now
    if singletons:
        singleton_rows(singletons, model, seeds, options)
    return counts
