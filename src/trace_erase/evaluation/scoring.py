"""From images to numbers: judge the base and erased images with the scorer, compute the suite's metrics, the drift
on retained prompts and the optional quality metrics. Shared by ``eval``, ``bench`` and ``rescore``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceEraseError
from .metrics import pixel_drifts, ssim, suite_metrics
from .scorers import Scorer
from .scorers.base import version
from .suites import SCENE_SUITES, PromptItem, Suite


def check_protocol(suite: Suite, reference: str | Path | None) -> None:
    """Combinations a suite needs beyond its scorer, checked before any image is drawn."""
    if suite.name == "coco" and reference is None:
        raise TraceEraseError("--suite coco needs --reference DIR (reference images, e.g. the COCO val images of "
                              "the captions) for its FID")
    if reference is not None and not Path(reference).is_dir():
        raise TraceEraseError(f"reference image folder '{reference}' does not exist; pass a folder of PNG/JPEG images")


def score_run(suite: Suite, scorer: Scorer, base: np.ndarray, erased: np.ndarray,
              reference: str | Path | None = None, fid_features: str = "toy", fid_weights: str | Path | None = None,
              clip_model: str | Path | None = None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(metrics {"base": ..., "erased": ...}, per-image judgements) for images drawn for ``suite.items``. A scene
    suite's metrics compare base and erased pictures slot by slot (:mod:`.scene_scoring`); each image's record of
    them is kept beside its judgements (``scene``), its drift is the other slot's."""
    items = suite.items
    judged = {"base": scorer.judge(base, items, suite)}
    judged["erased"] = judged["base"] if erased is base else scorer.judge(erased, items, suite)
    scene = suite.name in SCENE_SUITES
    if scene:
        from .scene_scoring import scene_scores

        metrics, records = scene_scores(suite, judged, base, erased)
    else:
        metrics = {side: suite_metrics(suite.name, items, j) for side, j in judged.items()}
    other = np.array([i.group == "other" for i in items])
    drifts = pixel_drifts(base[other], erased[other]) if other.any() and suite.name != "nudity" and not scene \
        else None
    if drifts is not None:
        metrics["erased"]["drift_l2"] = float(drifts.mean())
        metrics["erased"]["drift_ssim"] = ssim(base[other], erased[other])
        metrics["base"]["drift_l2"], metrics["base"]["drift_ssim"] = 0.0, 1.0
    quality = quality_metrics(items, base, erased, other, reference, fid_features, fid_weights, clip_model,
                              toy=scorer.kind == "toy")
    for key, (b_val, e_val) in quality.items():
        metrics["base"][key], metrics["erased"][key] = b_val, e_val
    per_image = [{"base": judged["base"][k], "erased": judged["erased"][k]} for k in range(len(items))]
    if scene:
        for k, rec in enumerate(records):
            per_image[k]["scene"] = rec
    if drifts is not None and erased is not base:  # per-image drift of the retained prompts (for intervals)
        for k, d in zip(np.flatnonzero(other), drifts, strict=True):
            per_image[k]["drift_l2"] = round(float(d), 6)
    return metrics, per_image


def quality_metrics(items: list[PromptItem], base: np.ndarray, erased: np.ndarray, other: np.ndarray,
                    reference: str | Path | None, fid_features: str, fid_weights: str | Path | None,
                    clip_model: str | Path | None, toy: bool = True) -> dict[str, tuple[float | None, float | None]]:
    """(base, erased) values of the quality metrics (torchmetrics). ``fid_vs_base`` (toy features: only for toy
    models, ``toy``) is skipped where torchmetrics is missing; explicitly requested metrics raise instead."""
    from .quality import clip_score, fid, fids, read_images

    out: dict[str, tuple[float | None, float | None]] = {}
    if toy and version("torchmetrics") is not None and int(other.sum()) >= 2:
        out["fid_vs_base"] = (0.0, fid(base[other], erased[other], features="toy"))
    if reference is not None:
        ref = read_images(reference, size=base.shape[1])
        base_fid, erased_fid = fids(ref, [base, erased], fid_features, fid_weights)
        out["fid_reference"] = (base_fid, erased_fid)
    if clip_model is not None:
        prompts = [i.prompt for i in items]
        out["clip_score"] = (clip_score(base, prompts, clip_model), clip_score(erased, prompts, clip_model))
    return out
