"""Scorers: one interface (:class:`Scorer`), one implementation per kind, built from ``KIND[:PATH]``.

======== ============================== =========================================================
kind     path                           gives
======== ============================== =========================================================
toy      (the bundled toy classifier)   label — toy class or style
clip     a CLIPModel folder             label (zero-shot over the suite's label prompts), score
imagenet weights (--arch + safetensors,  label — top-1 mapped through a class map
         or TorchScript with
         --allow-pickle)
nudenet  (NudeNet's bundled detector)   counts of exposed parts
face     an .onnx file or a transformers label — nearest identity of a --gallery
         folder
scene    (the bundled scene scorer, or  slots — per slot: class or empty, colour, style
         a folder with per-slot heads)
======== ============================== =========================================================

Nothing is downloaded: every path is local.
"""

from __future__ import annotations

from ...errors import TraceEraseError
from ..items import DEFAULT_SCORER, Suite
from .base import HINTS, PROVIDES, Scorer, ScorerOptions, check_provides, existing

SCORER_KINDS = tuple(PROVIDES)

__all__ = ["SCORER_KINDS", "Scorer", "ScorerOptions", "build_scorer", "scorer_for"]


def build_scorer(spec: str, options: ScorerOptions | None = None) -> Scorer:
    """The scorer ``spec`` names (``KIND`` or ``KIND:PATH``), loaded from local files."""
    from ...models.loading import quiet_loading

    kind, path = parse_spec(spec)
    with quiet_loading():
        return _build(kind, path, options or ScorerOptions())


def parse_spec(spec: str) -> tuple[str, str]:
    """``KIND[:PATH]`` → (kind, path); an unknown kind is one line."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in SCORER_KINDS:
        raise TraceEraseError(f"unknown scorer '{kind}'; use one of {', '.join(SCORER_KINDS)} (as KIND:PATH)")
    return kind, path.strip()


def _build(kind: str, path: str, opts: ScorerOptions) -> Scorer:
    if kind == "toy":
        from .toy import ToyScorer

        return ToyScorer(existing(path, kind, "CLASSIFIER_FOLDER") if path else None)
    if kind == "scene":
        from .scene import SceneScorer

        return SceneScorer(existing(path, kind, "SCENE_SCORER_FOLDER") if path else None)
    if kind == "nudenet":
        if path:
            raise TraceEraseError("--scorer nudenet takes no path (it uses the detector inside the nudenet package)")
        from .nudenet import NudeNetScorer

        return NudeNetScorer(threshold=opts.threshold)
    if kind == "clip":
        from .clip import ClipScorer

        return ClipScorer(existing(path, kind, "CLIP_MODEL_FOLDER"), device=opts.device)
    if kind == "imagenet":
        from .imagenet import ImageNetScorer

        return ImageNetScorer(existing(path, kind, "WEIGHTS"), arch=opts.arch, class_map=opts.class_map,
                              allow_pickle=opts.allow_pickle, device=opts.device)
    from .face import FaceScorer

    return FaceScorer(existing(path, kind, "MODEL.onnx"), opts.gallery, device=opts.device)


def scorer_for(suite: Suite, spec: str | None, options: ScorerOptions | None = None) -> Scorer:
    """The scorer for ``suite`` (``spec``, else the suite's default), checked to answer it — before any image is
    drawn, so a wrong combination fails in one line."""
    spec = spec or DEFAULT_SCORER.get(suite.name)
    if suite.name == "objects" and spec is None and suite.class_set is not None and suite.class_set.name == "toy":
        spec = "toy"
    if spec is None:
        raise TraceEraseError(f"--suite {suite.name} needs a scorer by path: {HINTS[suite.name]}")
    kind, _ = parse_spec(spec)
    check_provides(kind, PROVIDES[kind], suite)
    scorer = build_scorer(spec, options)
    scorer.check(suite)
    return scorer
