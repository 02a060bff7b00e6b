"""The scene suite's metric step: per picture, the scene metrics of :mod:`.scene_metrics` (base vs erased on the
same seed); per prompt group, their means and H_scene; and bootstrap 95 % intervals of every one of them, over seeds
(one evaluation) or over concepts × seeds (a bench), as :mod:`.intervals` draws them for the other suites.

Every scene metric is a mean over pictures of a per-picture value (SSIM too: each slot crop has the same number of
windows), so a picture's record — :func:`scene_metrics` of that picture alone — is all a resampled mean needs, and
the group's value is the mean of its records (the centroid shift: over pictures where both silhouettes exist).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .items import Suite
from .scene_metrics import scene_metrics
from .scene_suite import GROUPS, HEADLINE_GROUP

# per-picture values (the group's metric is their mean); h_scene is derived from acc_e and retention
RECORD_KEYS = ("acc_e", "acc_e_base", "became_target", "became_empty", "became_other", "retention",
               "retention_class", "retention_color", "retention_style", "iou", "centroid_shift", "vanished",
               "drift_l2", "drift_ssim")


def metric_name(group: str, key: str) -> str:
    """The results key of ``key`` in ``group``: unprefixed for the headline group, else ``<group>_<key>``."""
    return key if group == HEADLINE_GROUP else f"{group}_{key}"


def picture_records(suite: Suite, base_preds: list[dict], erased_preds: list[dict], base: np.ndarray,
                    erased: np.ndarray) -> list[dict[str, float | None]]:
    """Per picture: :func:`scene_metrics` of it alone (its target's slot from the item), ``None`` for a centroid
    shift without two silhouettes."""
    out = []
    for k, item in enumerate(suite.items):
        m = scene_metrics([base_preds[k]], [erased_preds[k]], base[k:k + 1], erased[k:k + 1], suite.concept,
                          [item.sides[0]])
        out.append({key: None if math.isnan(m[key]) else round(float(m[key]), 6) for key in RECORD_KEYS})
    return out


def _h(acc_e: float | np.ndarray, retention: float | np.ndarray) -> Any:
    """H_scene = 2 / (1/(1 − Acc_e) + 1/retention), 0 where either term is 0 (elementwise on arrays)."""
    x, y = 1 - np.asarray(acc_e, float), np.asarray(retention, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where((x > 0) & (y > 0), 2 * x * y / (x + y), 0.0)
    return np.where(np.isnan(x) | np.isnan(y), np.nan, h)


def group_metrics(records: list[dict[str, float | None]], groups: list[str]) -> dict[str, float | None]:
    """Each group's means of its pictures' records and its H_scene, under :func:`metric_name` keys."""
    out: dict[str, float | None] = {}
    for g in GROUPS:
        mine = [r for r, gr in zip(records, groups, strict=True) if gr == g]
        if not mine:
            continue
        for key in RECORD_KEYS:
            vals = [r[key] for r in mine if r.get(key) is not None]
            out[metric_name(g, key)] = float(np.mean(vals)) if vals else None
        out[metric_name(g, "h_scene")] = float(_h(out[metric_name(g, "acc_e")], out[metric_name(g, "retention")]))
    return out


def seed_units(seeds: list[int], groups: list[str], records: list[dict[str, float | None]]) -> list[dict[str, Any]]:
    """Per seed: sums and counts of every record value per group (``"<group>/<key>"``), the bootstrap's unit."""
    out: dict[int, dict[str, Any]] = {}
    for s, g, rec in zip(seeds, groups, records, strict=True):
        u = out.setdefault(s, {"seed": s, "sums": {}, "n": {}})
        for key, v in rec.items():
            if v is not None:
                name = f"{g}/{key}"
                u["sums"][name] = u["sums"].get(name, 0.0) + float(v)
                u["n"][name] = u["n"].get(name, 0) + 1
    return [out[s] for s in sorted(out)]


def scene_units(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-seed units of an evaluation's results dict (its per-picture scene records)."""
    prompts, per_image = result["prompts"], result["per_image"]
    return seed_units([p["seed"] for p in prompts], [p["group"] for p in prompts],
                      [j.get("scene", {}) for j in per_image])


def scene_intervals(per_concept: list[list[dict[str, Any]]], draws: int = 2000,
                    seed: int = 0) -> dict[str, list[float]]:
    """``<metric>_ci95`` → [2.5, 97.5] percentiles of the mean over concepts, each draw taking the concepts with
    replacement and, within each, its seeds with replacement (the group means pooled over the drawn seeds)."""
    if not per_concept or not all(per_concept):
        return {}
    keys = sorted({k for seeds in per_concept for u in seeds for k in u["n"]})
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_concept), (draws, len(per_concept)))
    vals = np.full((draws, len(per_concept), len(keys)), np.nan)
    for c, seeds in enumerate(per_concept):
        sums = np.array([[u["sums"].get(k, 0.0) for k in keys] for u in seeds])
        counts = np.array([[u["n"].get(k, 0) for k in keys] for u in seeds], float)
        where = np.argwhere(picks == c)
        idx = rng.integers(0, len(seeds), (len(where), len(seeds)))
        s, n = sums[idx].sum(1), counts[idx].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vals[where[:, 0], where[:, 1]] = np.where(n > 0, s / n, np.nan)
    col = {k: j for j, k in enumerate(keys)}
    out: dict[str, list[float]] = {}
    for g in GROUPS:
        if f"{g}/acc_e" in col and f"{g}/retention" in col:
            h = _h(vals[..., col[f"{g}/acc_e"]], vals[..., col[f"{g}/retention"]])
            vals = np.concatenate([vals, h[..., None]], -1)
            col[f"{g}/h_scene"] = vals.shape[-1] - 1
    with warnings.catch_warnings():  # a draw whose concepts all lack a value: NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        per_draw = np.nanmean(vals, axis=1)
    for name, j in col.items():
        means = per_draw[:, j][~np.isnan(per_draw[:, j])]
        if len(means):
            g, key = name.split("/")
            out[f"{metric_name(g, key)}_ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def scene_scores(suite: Suite, judged: dict[str, list[dict]], base: np.ndarray,
                 erased: np.ndarray) -> tuple[dict[str, dict[str, Any]], list[dict[str, float | None]]]:
    """(metrics {"base": ..., "erased": ...} with every metric's interval over seeds, the erased pictures'
    records). The base side is the base model against itself: its Acc_e, retention 1, no drift."""
    groups, seeds = [i.group for i in suite.items], [i.seed for i in suite.items]
    records = {"erased": picture_records(suite, judged["base"], judged["erased"], base, erased)}
    records["base"] = records["erased"] if erased is base else picture_records(suite, judged["base"],
                                                                               judged["base"], base, base)
    metrics = {}
    for side, recs in records.items():
        metrics[side] = {**group_metrics(recs, groups), **scene_intervals([seed_units(seeds, groups, recs)])}
    return metrics, records["erased"]
