"""Quality check of a toy pipeline: does it draw what the prompt names? (scored by the toy classifier)"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .classifier import ToyClassifier, load_classifier
from .render import CLASSES, STYLES, SYNONYMS


def _images(handle: Any, prompts: list[str], seeds: list[int], progress: bool) -> np.ndarray:
    from ..sampling import generate_images

    imgs = generate_images(handle, prompts, seeds, progress=progress)
    return np.stack([np.asarray(im.convert("RGB")) for im in imgs])


def quality_check(handle: Any, seeds: int = 50, classifier: ToyClassifier | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Per-class object accuracy ("a photo of a {class}"), synonym accuracy, style accuracy and the class
    histogram of unconditional samples, each prompt with seeds ``0..seeds-1``."""
    clf = classifier or load_classifier()
    seed_list = list(range(seeds))
    per_class, per_synonym = {}, {}
    for k, cls in enumerate(CLASSES):
        pred = clf.predict(_images(handle, [f"a photo of a {cls}"] * seeds, seed_list, progress))
        per_class[cls] = float((pred["class"] == k).mean())
        accs = []
        for syn in SYNONYMS[cls]:
            article = "an" if syn[0] in "aeiou" else "a"
            pred = clf.predict(_images(handle, [f"a photo of {article} {syn}"] * seeds, seed_list, progress))
            accs.append(float((pred["class"] == k).mean()))
        per_synonym[cls] = float(np.mean(accs))
    per_style = {}
    for k, style in enumerate(STYLES):
        prompts = [f"a {style} {CLASSES[i % len(CLASSES)]}" for i in seed_list]
        pred = clf.predict(_images(handle, prompts, seed_list, progress))
        per_style[style] = float((pred["style"] == k).mean())
    pred = clf.predict(_images(handle, [""] * seeds, seed_list, progress))
    hist = Counter(CLASSES[i] for i in pred["class"])
    return {
        "seeds": seeds,
        "object": per_class,
        "object_mean": float(np.mean(list(per_class.values()))),
        "object_min": float(min(per_class.values())),
        "synonym": per_synonym,
        "synonym_mean": float(np.mean(list(per_synonym.values()))),
        "style": per_style,
        "style_mean": float(np.mean(list(per_style.values()))),
        "unconditional_histogram": {c: hist.get(c, 0) for c in CLASSES},
        "unconditional_top_share": max(hist.values()) / seeds if hist else 0.0,
    }


def vae_reconstruction(vae: Any, n: int = 300, classifier: ToyClassifier | None = None) -> dict[str, Any]:
    """Classifier accuracy on a VAE's reconstructions of fresh renders (the ceiling for samples), overall and per
    style (fine patterns are what a coarser latent loses first)."""
    import torch

    from .data import render_set, to_tensor

    clf = classifier or load_classifier()
    data = render_set(8_000_000, n, progress=False)
    with torch.no_grad():
        x = to_tensor(data.images).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    arr = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    pred = clf.predict(arr)
    targets = data.targets()
    out: dict[str, Any] = {k: float((pred[k] == v.numpy()).mean()) for k, v in targets.items()}
    out["l1"] = float((rec.cpu() - to_tensor(data.images)).abs().mean())
    styles = targets["style"].numpy()
    out["style_by_style"] = {s: float((pred["style"][styles == k] == k).mean()) for k, s in enumerate(STYLES)
                             if (styles == k).any()}
    return out
