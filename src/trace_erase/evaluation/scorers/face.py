"""A face-identity scorer by path: a face-embedding model plus a gallery of reference images per identity; each image
is labelled with the nearest identity (top-1 cosine to the identity's mean embedding).

- Model: an ONNX file (e.g. an ArcFace ``w600k_r50.onnx``, run by onnxruntime; input NCHW RGB scaled
  ``(x − 127.5) / 127.5``, size from the model's input shape, 112 when it is dynamic), or a transformers model
  folder with safetensors weights (``AutoModel``; ``pooler_output`` or the first token as the embedding, the folder's
  ``preprocessor_config.json`` mean/std when present, else 0.5/0.5).
- Gallery: ``DIR/<name>/*.png|jpg`` — one folder per identity, named as in the suite (``_`` reads as a space, case
  does not matter).

No face detector runs first: the whole image, centre-cropped to a square, is embedded, and the gallery images go
through the same path. Portrait prompts put the face in most of the frame; small faces in wide shots are
identified less reliably. (The GIPHY celebrity detector the paper line used is not installable.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import TraceEraseError
from ..quality import IMAGE_SUFFIXES
from ..suites import PromptItem, Suite
from .base import PROVIDES, Scorer, digest, version


def _square(images: list[Any] | np.ndarray) -> list[np.ndarray]:
    """Centre-cropped square uint8 crops (side: the shorter side of each image)."""
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        h, w = a.shape[:2]
        s = min(h, w)
        out.append(a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
    return out


class FaceScorer(Scorer):
    """Nearest gallery identity per image."""

    kind = "face"
    provides = PROVIDES["face"]

    def __init__(self, model: Path, gallery: str | None, device: str = "cpu"):
        super().__init__()
        if not gallery:
            raise TraceEraseError("the face scorer needs --gallery DIR (one folder of reference images per identity)")
        self.device = device
        if model.is_file() and model.suffix == ".onnx":
            self._load_onnx(model)
        elif model.is_dir() and (model / "config.json").is_file():
            self._load_transformers(model)
        else:
            raise TraceEraseError(f"face model '{model}' is neither an .onnx file nor a transformers model folder "
                                  "(config.json + model.safetensors)")
        self.names, self.centroids, gallery_digest = self._gallery(Path(gallery))
        self.identity.update({"name": "face-identity", "path": str(model), "sha256": digest(model),
                              "version": self.runtime_version, "gallery": str(gallery),
                              "gallery_sha256": gallery_digest, "identities": len(self.names),
                              "rule": "nearest identity (cosine to the mean gallery embedding), top-1, no detector"})

    def _load_onnx(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise TraceEraseError("an .onnx face model needs onnxruntime: pip install onnxruntime") from exc
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TraceEraseError(f"'{path}' is not a loadable ONNX model ({type(exc).__name__}); pass an ONNX "
                                  "face-embedding model") from exc
        shape = self.session.get_inputs()[0].shape
        self.size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else 112
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # (x/255 − .5)/.5 = (x − 127.5)/127.5
        self.runtime_version = f"onnxruntime {version('onnxruntime')}"
        self._forward = self._onnx_forward

    def _onnx_forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        return torch.from_numpy(np.asarray(self.session.run(None, {name: x.numpy().astype(np.float32)})[0]))

    def _load_transformers(self, folder: Path) -> None:
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(folder), use_safetensors=True).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise TraceEraseError(f"could not load the face model folder '{folder}' ({exc}); it needs config.json "
                                  "and model.safetensors") from exc
        cfg = self.model.config
        self.size = int(getattr(cfg, "image_size", 112))
        pre = folder / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = tuple(stats.get("image_mean", (0.5, 0.5, 0.5)))
        self.std = tuple(stats.get("image_std", (0.5, 0.5, 0.5)))
        self.runtime_version = f"transformers {version('transformers')}"
        self._forward = self._transformers_forward

    @torch.no_grad()
    def _transformers_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x.to(self.device))
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float().cpu()

    def embed(self, images: list[Any] | np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings of centre-cropped images."""
        from ..backends import normalized_pixels

        crops = _square(images)
        out = []
        for i in range(0, len(crops), batch_size):
            chunk = crops[i : i + batch_size]
            x = torch.cat([normalized_pixels([c], self.size, self.mean, self.std, mode="bilinear") for c in chunk])
            out.append(self._forward(x).reshape(len(chunk), -1))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    def _gallery(self, root: Path) -> tuple[list[str], torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        if not root.is_dir():
            raise TraceEraseError(f"gallery '{root}' is not a folder; pass --gallery DIR with one folder per identity")
        names, centroids = [], []
        h = hashlib.sha256()
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                continue
            images = []
            for f in files:
                h.update(f"{folder.name}/{f.name}".encode())
                h.update(f.read_bytes())
                try:
                    with Image.open(f) as im:
                        images.append(im.convert("RGB"))
                except (UnidentifiedImageError, OSError) as exc:
                    raise TraceEraseError(f"cannot read gallery image '{f}' ({exc}); remove or replace it") from exc
            names.append(folder.name.replace("_", " "))
            centroids.append(torch.nn.functional.normalize(self.embed(images).mean(0), dim=0))
        if not names:
            raise TraceEraseError(f"gallery '{root}' has no identity folders with images (DIR/<name>/*.png)")
        return names, torch.stack(centroids), h.hexdigest()

    def check(self, suite: Suite) -> None:
        super().check(suite)
        known = {n.lower() for n in self.names}
        missing = [lab for lab in suite.labels if lab.lower() not in known]
        if missing:
            raise TraceEraseError(f"the gallery lacks {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                                  "add a folder of reference images per identity, or pass --retained with the "
                                  "names it has")

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        by_lower = {lab.lower(): lab for lab in suite.labels}
        sims = self.embed(list(images)) @ self.centroids.T
        best = sims.argmax(1)
        return [{"label": by_lower.get(self.names[int(b)].lower(), self.names[int(b)]),
                 "similarity": round(float(sims[k, b]), 4)} for k, b in enumerate(best)]
