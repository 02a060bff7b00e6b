"""Bootstrap intervals for the bench table: how far a method's mean could move with other classes and seeds.

A two-level bootstrap over the bench's own statistic: draw the concepts with replacement, and within each drawn
concept draw its seeds with replacement; recompute each concept's accuracies (then H_o / H_c / H_s) and drift from
the drawn seeds and average over the drawn concepts, as the table does. The 2.5 and 97.5 percentiles of 2,000 draws
are the 95 % interval. "Ahead" in a table means the intervals do not overlap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TraceEraseError
from .metrics import h_identities, h_objects
from .suites import SCENE_SUITES

HEADLINE = {"objects": "h_o", "toy-objects": "h_o", "celebrities": "h_c", "toy-styles": "h_s",
            "toy-scenes": "h_scene"}


def units(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed of one evaluation: hits and counts per group, and the retained prompts' per-image drift (a scene
    suite: sums and counts of every per-picture scene value, :func:`.scene_scoring.scene_units`)."""
    if result["suite"] in SCENE_SUITES:
        from .scene_scoring import scene_units

        return scene_units(result)
    out: dict[int, dict[str, Any]] = {}
    for prompt, judged in zip(result["prompts"], result["per_image"], strict=True):
        u = out.setdefault(prompt["seed"], {"seed": prompt["seed"], "hits": {}, "n": {}, "drift": []})
        if "label" in judged["erased"]:
            g = prompt["group"]
            u["hits"][g] = u["hits"].get(g, 0) + int(judged["erased"]["label"] == prompt["label"])
            u["n"][g] = u["n"].get(g, 0) + 1
        if "drift_l2" in judged:
            u["drift"].append(judged["drift_l2"])
    return [out[s] for s in sorted(out)]


def intervals(suite: str, per_concept: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    """``<metric>_ci95`` intervals of a method's means over concepts: the headline and drift (label suites), every
    metric (scene suites)."""
    if suite in SCENE_SUITES:
        from .scene_scoring import scene_intervals

        return scene_intervals(per_concept)
    ci = bootstrap(suite, per_concept)
    out = {f"{HEADLINE[suite]}_ci95": list(ci["headline"])} if ci["headline"] is not None else {}
    return {**out, **({"drift_l2_ci95": list(ci["drift_l2"])} if ci["drift_l2"] is not None else {})}


def unit_metrics(suite: str, seeds: list[dict[str, Any]]) -> dict[str, float | None]:
    """One concept's accuracies, headline and mean drift from some of its per-seed units, as its evaluation computes
    them from all (evaluation/metrics.py): a label suite's ``acc_e``, ``acc_s``, ``acc_g``, ``acc_c`` (composed), the
    headline and ``drift_l2``."""
    def acc(g: str) -> float | None:
        n = sum(u["n"].get(g, 0) for u in seeds)
        return sum(u["hits"].get(g, 0) for u in seeds) / n if n else None

    drift = [d for u in seeds for d in u["drift"]]
    e, s, g = acc("erased"), acc("other"), acc("synonym")
    out = {"acc_e": e, "acc_s": s, "acc_g": g, "acc_c": acc("composed"),
           "drift_l2": float(np.mean(drift)) if drift else None}
    head = HEADLINE.get(suite)
    if head == "h_o":
        out[head] = h_objects(e, s, g) if None not in (e, s, g) else None
    elif head in ("h_c", "h_s"):
        out[head] = h_identities(e, s) if None not in (e, s) else None
    return out


def _concept_stats(suite: str, seeds: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    m = unit_metrics(suite, seeds)
    return m.get(HEADLINE.get(suite, "")), m["drift_l2"]


def bootstrap(suite: str, per_concept: list[list[dict[str, Any]]], draws: int = 2000,
              seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """95 % intervals of the mean headline metric (H_o / H_c / H_s) and mean drift over concepts × seeds."""
    if not per_concept or not all(per_concept):
        return {"headline": None, "drift_l2": None}
    rng = np.random.default_rng(seed)
    heads, drifts = [], []
    for _ in range(draws):
        h_vals, d_vals = [], []
        for c in rng.integers(0, len(per_concept), len(per_concept)):
            seeds = per_concept[c]
            drawn = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
            h, d = _concept_stats(suite, drawn)
            if h is not None:
                h_vals.append(h)
            if d is not None:
                d_vals.append(d)
        if h_vals:
            heads.append(np.mean(h_vals))
        if d_vals:
            drifts.append(np.mean(d_vals))

    def ci(values: list[float]) -> tuple[float, float] | None:
        return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values else None

    return {"headline": ci(heads), "drift_l2": ci(drifts)}


def paired_bootstrap(suite: str, focus: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]],
                     draws: int = 2000, seed: int = 0) -> dict[str, dict[str, Any] | None]:
    """The difference ``focus − other`` of the mean headline metric and of the mean drift, for two methods run on
    the same concepts and seeds, with a 95 % interval from resampling concepts and, within each, seeds — the same
    draw for both methods. Shared noise (a class or seed that is hard for every erasure) cancels, so this interval
    is what says whether one method is ahead; two separate intervals overlap long after the paired one has
    cleared 0. Concepts pair by position, seeds by their number."""
    if suite in SCENE_SUITES:
        raise TraceEraseError("paired intervals cover the label suites (objects, styles, celebrities); compare scene "
                              "suites metric by metric from their own intervals")
    if len(focus) != len(other) or not focus:
        raise TraceEraseError(f"paired intervals need the same concepts for both methods (got {len(focus)} and "
                              f"{len(other)})")
    pairs = []
    for a, b in zip(focus, other, strict=True):
        by_seed = {u["seed"]: u for u in b}
        if sorted(by_seed) != sorted(u["seed"] for u in a):
            raise TraceEraseError("paired intervals need the same seeds for both methods; rerun one with the "
                                  "other's --seeds")
        pairs.append([(u, by_seed[u["seed"]]) for u in a])

    def means(drawn: list[list[tuple[dict, dict]]]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        stats = [(_concept_stats(suite, [p[0] for p in c]), _concept_stats(suite, [p[1] for p in c])) for c in drawn]
        for k, key in enumerate(("headline", "drift_l2")):
            vals = [(sa[k], sb[k]) for sa, sb in stats if sa[k] is not None and sb[k] is not None]
            out[key] = float(np.mean([va - vb for va, vb in vals])) if vals else None
        return out

    point = means(pairs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"headline": [], "drift_l2": []}
    for _ in range(draws):
        drawn = []
        for c in rng.integers(0, len(pairs), len(pairs)):
            seeds = pairs[c]
            drawn.append([seeds[i] for i in rng.integers(0, len(seeds), len(seeds))])
        for key, value in means(drawn).items():
            if value is not None:
                samples[key].append(value)
    return {key: None if point[key] is None else
            {"mean": point[key], "ci": (float(np.percentile(samples[key], 2.5)),
                                        float(np.percentile(samples[key], 97.5)))}
            for key in samples}
