"""Image quality: FID and CLIP score, both computed by torchmetrics (one pinned library) so that our numbers
use its published definitions.

FID needs a feature network. Where nothing can be downloaded the choices are explicit, never a silent fetch:

- ``toy``: the bundled toy classifier's 128-d pooled features (the toy world's FID; comparable only within it);
- ``inception``: torch-fidelity's InceptionV3 (the standard FID) from a weights file given by path
  (``pt_inception-2015-12-05-6726825d.pth``; needs ``pip install torch-fidelity``);
- ``clip``: the image tower of a CLIP model folder (FID-CLIP).

Reference images are given by path (a folder of images), or as an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TraceEraseError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_FEATURES = ("toy", "inception", "clip")


def read_images(folder: str | Path, size: int | None = None, limit: int | None = None) -> np.ndarray:
    """All images of a folder (sorted by name) as uint8 ``[N, H, W, 3]``, resized to ``size`` when given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(folder)
    if not path.is_dir():
        raise TraceEraseError(f"reference image folder '{path}' does not exist; pass a folder of PNG/JPEG images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise TraceEraseError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{path}'")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                out.append(np.asarray(im))
        except (UnidentifiedImageError, OSError) as exc:
            raise TraceEraseError(f"cannot read image '{f}' ({exc}); remove or replace it") from exc
    if len({a.shape for a in out}) > 1:
        raise TraceEraseError(f"images in '{path}' differ in size; pass a size to resize them")
    return np.stack(out)


class _ToyFeatures(nn.Module):
    """Pooled trunk features of the toy classifier; input float images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        from ..toyworld.classifier import load_classifier

        self.net = load_classifier().eval()
        self.num_features = int(self.net.heads["class"].in_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * 2 - 1
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="area")
        return self.net.trunk(x)


class _ClipFeatures(nn.Module):
    """Image embeddings of a CLIP model folder; input float images in [0, 1]."""

    def __init__(self, model: str | Path):
        super().__init__()
        from .backends import ClipBackend

        self.clip = ClipBackend(model)
        self.num_features = int(self.clip.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        feats = self.clip.model.get_image_features(pixel_values=self.clip.pixels(list(arr)))
        return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


def fid_metric(features: str = "toy", weights: str | Path | None = None, keep_reference: bool = False) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` with the named feature network (see the module docstring);
    with ``keep_reference`` its ``reset()`` clears only the generated side."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise TraceEraseError("FID needs torchmetrics; install the extra: pip install 'trace-erase[quality]'") from exc
    if features == "toy":
        return FrechetInceptionDistance(feature=_ToyFeatures(), normalize=True, reset_real_features=not keep_reference)
    if features == "clip":
        if weights is None:
            raise TraceEraseError("FID with CLIP features needs --fid-weights CLIP_MODEL_FOLDER")
        return FrechetInceptionDistance(feature=_ClipFeatures(weights), normalize=True,
                                        reset_real_features=not keep_reference)
    if features == "inception":
        if weights is None or not Path(weights).is_file():
            raise TraceEraseError("FID with InceptionV3 needs --fid-weights PATH to torch-fidelity's "
                                  "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        try:
            return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights),
                                            reset_real_features=not keep_reference)
        except ModuleNotFoundError as exc:
            raise TraceEraseError("FID with InceptionV3 needs torch-fidelity: pip install torch-fidelity") from exc
    raise TraceEraseError(f"unknown FID features '{features}'; use one of {', '.join(FID_FEATURES)}")


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def fids(reference: np.ndarray | str | Path, generated: Sequence[np.ndarray], features: str = "toy",
         weights: str | Path | None = None, batch_size: int = 64) -> list[float]:
    """Fréchet distance of each set of generated uint8 ``[N, H, W, 3]`` images to the reference images (array or
    folder); the reference features are extracted once."""
    ref = read_images(reference) if isinstance(reference, str | Path) else reference
    if len(ref) < 2 or any(len(g) < 2 for g in generated):
        raise TraceEraseError("FID needs at least 2 reference and 2 generated images (hundreds for a stable value)")
    metric = fid_metric(features, weights, keep_reference=True)
    for i in range(0, len(ref), batch_size):
        metric.update(_to_unit(ref[i : i + batch_size]), real=True)
    out = []
    for images in generated:
        metric.reset()
        for i in range(0, len(images), batch_size):
            metric.update(_to_unit(images[i : i + batch_size]), real=False)
        out.append(float(metric.compute()))
    return out


def fid(reference: np.ndarray | str | Path, generated: np.ndarray, features: str = "toy",
        weights: str | Path | None = None, batch_size: int = 64) -> float:
    """Fréchet distance between reference images (array or folder) and generated uint8 ``[N, H, W, 3]`` images."""
    return fids(reference, [generated], features, weights, batch_size)[0]


def clip_processor(model: str | Path) -> Any:
    """The folder's ``CLIPProcessor``, or one assembled from its tokenizer and the model's image size."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPProcessor

    try:
        return CLIPProcessor.from_pretrained(str(model))
    except (OSError, ValueError, TypeError):
        size = CLIPConfig.from_pretrained(str(model)).vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return CLIPProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(str(model)))


class _TensorFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors: transformers 5 returns model outputs there, which
    torchmetrics 1.9 does not unwrap."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def clip_score(images: np.ndarray, prompts: Sequence[str], model: str | Path, batch_size: int = 64) -> float:
    """Mean CLIP score (torchmetrics: 100 · max(cos, 0)) of images against their prompts, with a local CLIP model."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as exc:
        raise TraceEraseError("CLIP score needs torchmetrics; pip install 'trace-erase[quality]'") from exc
    from transformers import CLIPModel

    if len(images) != len(prompts):
        raise TraceEraseError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    try:
        clip = CLIPModel.from_pretrained(str(model)).eval()
        processor = clip_processor(model)
    except OSError as exc:
        raise TraceEraseError(f"could not load CLIP model '{model}'; pass a local CLIPModel folder") from exc
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip), processor))
    for i in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        metric.update(list(chunk), list(prompts[i : i + batch_size]))
    return float(metric.compute())
