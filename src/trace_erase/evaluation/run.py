"""Run an evaluation: generate the suite's images before and after an erasure on the same seeds, score them with
the suite's scorer, and write ``results.json``, ``report.html`` and the PNGs."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.erasure import Erasure
from ..io import check_writable, output_folder
from ..models import ModelHandle
from ..runtime import process_state
from ..sampling import generate_images, sampler_settings
from .report import write_report
from .scene_suite import check_scene_handle
from .scorers import Scorer, ScorerOptions, scorer_for
from .scorers.base import version
from .scoring import check_protocol, score_run
from .suites import SCENE_SUITES, PromptItem, Suite, build_suite


def sharded(n: int, work: Callable[[list[int]], list[Any]]) -> list[Any]:
    """``work(indices)`` for items ``0..n-1``. Under ``accelerate launch`` the indices are split across the
    processes and the results gathered, in order, on every process; otherwise one call does all."""
    state = process_state()
    if state.num_processes == 1:
        return list(work(list(range(n))))
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(n))) as mine:
        pairs = list(zip(mine, list(work(list(mine))) if mine else [], strict=True))
    gathered = dict(gather_object(pairs))
    return [gathered[i] for i in range(n)]


def image_caches(workdir: str | Path | None, handle: ModelHandle, erasure: Erasure | None,
                 scale: float) -> tuple[Path | None, Path | None]:
    """Where an evaluation keeps its finished batches (base model; with the erasure), named by what drew them, so a
    resumed run reuses only images of the same model, erasure and strength."""
    if workdir is None:
        return None, None
    digest = hashlib.sha256(f"{handle.source}|{handle.adapter.family}".encode())
    base = Path(workdir) / f"base-{digest.hexdigest()[:16]}"
    if erasure is None:
        return base, None
    for part in (erasure.state_dict, erasure.gated_state_dict or {}):
        for key in sorted(part):
            digest.update(key.encode())
            digest.update(part[key].detach().float().cpu().numpy().tobytes())
    digest.update(f"|{scale}|{json.dumps(erasure.manifest.get('gate'), sort_keys=True)}".encode())
    return base, Path(workdir) / f"erased-{digest.hexdigest()[:16]}"


def images_for(handle: ModelHandle, items: list[PromptItem], progress: bool, **kw: Any) -> np.ndarray:
    """Images for ``items`` (each from its own seed; a prompt with its own guidance keeps it), sharded across
    processes under ``accelerate launch``."""
    main = process_state().is_main_process
    return np.stack(sharded(len(items), lambda idx: list(_images(handle, [items[i] for i in idx],
                                                                 progress and main, **kw)) if idx else []))


def _images(handle: ModelHandle, items: list[PromptItem], progress: bool, **kw: Any) -> np.ndarray:
    """One batch run per guidance value, so per-prompt guidance (I2P) is honoured and the rest batch together."""
    by_guidance: dict[float | None, list[int]] = {}
    for k, item in enumerate(items):
        by_guidance.setdefault(item.guidance, []).append(k)
    out: list[Any] = [None] * len(items)
    for g, idx in by_guidance.items():
        imgs = generate_images(handle, [items[k].prompt for k in idx], [items[k].seed for k in idx], guidance=g,
                               progress=progress, **kw)
        for k, im in zip(idx, imgs, strict=True):
            out[k] = np.asarray(im.convert("RGB"))
    return np.stack(out)


def evaluate(
    handle: ModelHandle,
    erasure: Erasure | None,
    suite: str | Suite,
    concept: str | None,
    output: str | Path,
    seeds: int = 10,
    scale: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    base_images: np.ndarray | None = None,
    reference: str | Path | None = None,
    fid_features: str = "toy",
    fid_weights: str | Path | None = None,
    clip_model: str | Path | None = None,
    scheduler: str | None = None,
    workdir: str | Path | None = None,
    scorer: str | Scorer | None = None,
    scorer_options: ScorerOptions | None = None,
    prompts: str | Path | None = None,
    classes: str | None = None,
    retained: list[str] | None = None,
    show_nudity: bool = False,
) -> dict[str, Any]:
    """Evaluate ``erasure`` (or the base model alone) on ``suite``; returns the results dict it also writes.

    ``suite`` is a :class:`Suite` or a suite name (built for ``concept`` with ``seeds``, ``prompts``, ``classes``,
    ``retained``); ``scorer`` a :class:`Scorer` or ``KIND[:PATH]`` (default: the suite's). With ``workdir`` finished
    generation batches are kept there, and a rerun after an interruption reuses them.

    Images come from the pipeline's own ``__call__`` with the family's evaluation sampler (SD: DDIM; ``scheduler``
    overrides it), batched as the handle's runtime says; ``results.json`` records both, the scorer's identity and
    every image's judgement, so :func:`~trace_erase.evaluation.rescore.rescore` can score the saved images again.

    Quality: ``fid_vs_base`` (toy scorer only: FID of the erased model's images for the other prompts against the
    base model's, toy features); ``fid_reference`` against a folder of reference images and ``clip_score`` with a
    local CLIP model when given."""
    from ..api import library_versions

    final = Path(output)
    check_writable(final, overwrite, "evaluation output")
    if not isinstance(suite, Suite):
        suite = build_suite(suite, concept or "", seeds, prompts=prompts, classes=classes, retained=retained)
    if isinstance(scorer, Scorer):
        scorer.check(suite)
    else:
        scorer = scorer_for(suite, scorer, scorer_options)
    check_protocol(suite, reference)
    items = suite.items
    sampler = sampler_settings(handle, scheduler=scheduler)
    check_scene_handle(sampler, suite, getattr(scorer, "image_size", None))
    cache_base, cache_erased = image_caches(workdir, handle, erasure, scale)
    t0 = time.perf_counter()
    base = base_images if base_images is not None else images_for(handle, items, progress, scheduler=scheduler,
                                                                  cache=cache_base)
    t_base = time.perf_counter() - t0
    erased = base
    if erasure is not None:
        erasure.apply(handle, scale=scale)
        erased = images_for(handle, items, progress, scheduler=scheduler, cache=cache_erased)
    t_erased = time.perf_counter() - t0 - t_base
    quality = {"reference": reference, "fid_features": fid_features, "fid_weights": fid_weights,
               "clip_model": clip_model}
    metrics, per_image = score_run(suite, scorer, base, erased, **quality)
    results = {
        "model": handle.source,
        "suite": suite.name,
        "concept": suite.concept,
        "method": erasure.method if erasure else "base",
        "metrics": metrics,
        "settings": {
            "suite": suite.describe(),
            "scorer": scorer.identity,
            "seeds_per_prompt": max(Counter(i.prompt for i in items).values()),
            "seeds": sorted({i.seed for i in items}),
            "sampler": sampler,
            "per_prompt_guidance": any(i.guidance is not None for i in items),
            "erasure_scale": scale if erasure else None,
            "erasure_config": erasure.manifest.get("config") if erasure else None,
            "drift": DRIFT["scene" if suite.name in SCENE_SUITES else "other"],
            "quality": {"library": "torchmetrics " + str(version("torchmetrics")),
                        "fid_vs_base": "toy features, 'other' prompts (toy scorer only)",
                        "reference": str(reference) if reference else None, "fid_features": fid_features,
                        "fid_weights": str(fid_weights) if fid_weights else None,
                        "clip_model": str(clip_model) if clip_model else None},
            "formulas": FORMULAS,
            "versions": library_versions(),
        },
        "timings": {"generate_base_s": t_base, "generate_erased_s": t_erased},
        "prompts": [{"prompt": i.prompt, "seed": i.seed, "group": i.group, "label": i.label, "head": i.head,
                     "guidance": i.guidance, **({"sides": list(i.sides)} if i.sides else {})} for i in items],
        "per_image": per_image,
    }
    results["settings"]["processes"] = process_state().num_processes
    if _is_main_process():  # under accelerate, the main process writes the folder
        write_results(final, overwrite, results, base, erased, show_nudity)
    results["report"] = str(final / "report.html")
    return results


FORMULAS = {"h_o": "3 / (1/(1-acc_e) + 1/acc_s + 1/(1-acc_g))", "h_c": "2 / (1/(1-acc_e) + 1/acc_s)",
            "h_s": "2 / (1/(1-acc_e) + 1/acc_s)",
            "h_a": "clip_s - clip_e", "clip_score": "100 * max(cos(image, prompt), 0), mean over images",
            "h_scene": "2 / (1/(1-acc_e) + 1/retention), per prompt group (scene suites)"}
DRIFT = {"other": "over the 'other' prompts: mean per-pixel RGB L2 in [0,1] and 7×7 luminance SSIM vs base",
         "scene": "masked to the other object's 32×32 slot: mean per-pixel RGB L2 in [0,1] and 7×7 luminance SSIM "
                  "vs the base picture of the same seed"}


def write_results(final: Path, overwrite: bool, results: dict[str, Any], base: np.ndarray, erased: np.ndarray,
                  show_nudity: bool = False) -> None:
    """The evaluation folder — ``images/{base,erased}/NNNNN.png``, ``results.json``, ``report.html`` — written in a
    temporary folder and moved into place at the end."""
    from PIL import Image

    with output_folder(final, overwrite, "evaluation output") as tmp:
        for kind, arr in (("base", base), ("erased", erased)):
            (tmp / "images" / kind).mkdir(parents=True, exist_ok=True)
            for k in range(len(arr)):
                Image.fromarray(arr[k]).save(tmp / "images" / kind / f"{k:05d}.png")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_report(tmp, results, blur=results["suite"] == "nudity" and not show_nudity)


def _is_main_process() -> bool:
    return process_state().is_main_process


