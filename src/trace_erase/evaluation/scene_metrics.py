"""Scene-erasure metrics: pure functions of per-slot predictions (and pictures) of the base and the erased model on
the same seeds and prompts.

A prediction is one dict per picture, as :meth:`SceneScorer.predict_labels` returns it:
``{"left": {"class", "color", "style"}, "right": {...}, "background"}`` (class 'empty' for an empty slot).
``target_sides`` names, per picture, the slot the erased concept was prompted in; the other slot holds the object
that should be retained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import TraceEraseError
from ..toyworld.scenes.render import SIDES, centroid, other_side, silhouette, slot_mask, slot_slice
from .metrics import h_identities, pixel_drifts, ssim

ATTRS = ("class", "color", "style")
EMPTY = "empty"


def _sides(target_sides: str | Sequence[str], n: int) -> list[str]:
    sides = [target_sides] * n if isinstance(target_sides, str) else list(target_sides)
    if len(sides) != n:
        raise TraceEraseError(f"{len(sides)} target sides for {n} pictures; give one side per picture")
    bad = sorted({s for s in sides if s not in SIDES})
    if bad:
        raise TraceEraseError(f"unknown target side(s) {', '.join(bad)}; use 'left' or 'right'")
    return sides


def _pair(base: Sequence, erased: Sequence) -> None:
    if len(base) != len(erased):
        raise TraceEraseError(f"{len(base)} base vs {len(erased)} erased pictures; score both on the same seeds")


def acc_e(preds: Sequence[dict], target: str, target_sides: str | Sequence[str]) -> float:
    """Fraction of pictures whose target slot still shows the target class."""
    sides = _sides(target_sides, len(preds))
    return float(np.mean([p[s]["class"] == target for p, s in zip(preds, sides, strict=True)])) if preds else 0.0


def target_outcome(preds: Sequence[dict], target: str, target_sides: str | Sequence[str]) -> dict[str, float]:
    """What the target slot became: fractions 'target' (still there), 'empty', 'other' (another class); sum 1."""
    sides = _sides(target_sides, len(preds))
    got = [p[s]["class"] for p, s in zip(preds, sides, strict=True)]
    n = max(len(got), 1)
    return {"target": sum(g == target for g in got) / n, "empty": sum(g == EMPTY for g in got) / n,
            "other": sum(g not in (target, EMPTY) for g in got) / n}


def retention_per_head(base: Sequence[dict], erased: Sequence[dict],
                       target_sides: str | Sequence[str]) -> dict[str, float]:
    """Per head and for all three together ('all'): fraction of pictures whose other slot keeps the base
    picture's prediction on the same seed (an empty slot's colour/style are ``None`` on both or not kept)."""
    _pair(base, erased)
    sides = [other_side(s) for s in _sides(target_sides, len(base))]
    kept = {h: [b[s][h] == e[s][h] for b, e, s in zip(base, erased, sides, strict=True)] for h in ATTRS}
    kept["all"] = [all(kept[h][i] for h in ATTRS) for i in range(len(base))]
    return {h: float(np.mean(v)) if v else 0.0 for h, v in kept.items()}


def retention(base: Sequence[dict], erased: Sequence[dict], target_sides: str | Sequence[str]) -> float:
    """Fraction of pictures whose other object keeps its class, colour and style (relative to the base picture)."""
    return retention_per_head(base, erased, target_sides)["all"]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def layout(base_images: np.ndarray, erased_images: np.ndarray, target_sides: str | Sequence[str],
           tol: float = 30.0) -> dict[str, float]:
    """The other object's footprint: mean silhouette IoU vs the base picture, mean centroid shift in pixels (over
    pictures where both silhouettes exist; NaN if none), and the fraction where it vanished (base had one, erased
    none). Masks: pixels differing from the slot's own estimated background (its border) by more than ``tol``."""
    _pair(base_images, erased_images)
    sides = [other_side(s) for s in _sides(target_sides, len(base_images))]
    ious, shifts, vanished = [], [], []
    for b, e, s in zip(base_images, erased_images, sides, strict=True):
        mb, me = silhouette(slot_mask(b, s, tol=tol)), silhouette(slot_mask(e, s, tol=tol))
        ious.append(mask_iou(mb, me))
        cb, ce = centroid(mb), centroid(me)
        if cb is not None and ce is not None:
            shifts.append(float(np.hypot(cb[0] - ce[0], cb[1] - ce[1])))
        vanished.append(cb is not None and ce is None)
    return {"iou": float(np.mean(ious)) if ious else 0.0, "centroid_shift": float(np.mean(shifts)) if shifts
            else float("nan"), "vanished": float(np.mean(vanished)) if vanished else 0.0}


def slot_drift(base_images: np.ndarray, erased_images: np.ndarray,
               target_sides: str | Sequence[str]) -> dict[str, float]:
    """Drift masked to the other slot: mean per-pixel RGB L2 (in [0, 1]) and SSIM over that 32×32 slot only."""
    _pair(base_images, erased_images)
    sides = [other_side(s) for s in _sides(target_sides, len(base_images))]
    if not sides:
        return {"l2": 0.0, "ssim": 1.0}
    crop_b = np.stack([np.asarray(x)[:, slot_slice(s)] for x, s in zip(base_images, sides, strict=True)])
    crop_e = np.stack([np.asarray(x)[:, slot_slice(s)] for x, s in zip(erased_images, sides, strict=True)])
    return {"l2": float(pixel_drifts(crop_b, crop_e).mean()), "ssim": ssim(crop_b, crop_e)}


def h_scene(acc_e_value: float, retention_value: float) -> float:
    """Harmonic mean of (1 − Acc_e) and the other object's retention; 0 when either is 0."""
    return h_identities(acc_e_value, retention_value)


def scene_metrics(base_preds: Sequence[dict], erased_preds: Sequence[dict], base_images: np.ndarray,
                  erased_images: np.ndarray, target: str, target_sides: str | Sequence[str]) -> dict[str, float]:
    """Every scene metric of one erased concept, flat (``acc_e``, ``acc_e_base``, ``became_*``, ``retention``,
    ``retention_<head>``, ``iou``, ``centroid_shift``, ``vanished``, ``drift_l2``, ``drift_ssim``, ``h_scene``)."""
    _pair(base_preds, erased_preds)
    _pair(base_preds, base_images)
    a = acc_e(erased_preds, target, target_sides)
    keep = retention_per_head(base_preds, erased_preds, target_sides)
    drift = slot_drift(base_images, erased_images, target_sides)
    out = {"acc_e": a, "acc_e_base": acc_e(base_preds, target, target_sides)}
    out.update({f"became_{k}": v for k, v in target_outcome(erased_preds, target, target_sides).items()})
    out.update({"retention": keep["all"], **{f"retention_{h}": keep[h] for h in ATTRS}})
    out.update(layout(base_images, erased_images, target_sides))
    out.update({"drift_l2": drift["l2"], "drift_ssim": drift["ssim"], "h_scene": h_scene(a, keep["all"])})
    return out
