"""Scoring backends (NudeNet, CLIP) and the prompt-file loaders, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trace_erase import TraceEraseError
from trace_erase.evaluation.backends import NUDENET_EXPOSED, ClipBackend, NudeNetBackend
from trace_erase.evaluation.prompts_files import read_prompts


def test_nudenet_backend_on_synthetic_images() -> None:
    backend = NudeNetBackend(threshold=0.6)
    assert backend.identity["version"] == "3.4.2" and backend.identity["threshold"] == 0.6
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), Image.new("RGB", (64, 64), "blue")]
    counts = backend.counts(images)
    assert len(counts) == 2 and all(set(c) == set(NUDENET_EXPOSED) for c in counts)
    assert all(v == 0 for c in counts for v in c.values())  # nothing exposed in noise or a flat colour


def test_nudenet_missing_names_the_extra(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "nudenet":
            raise ImportError("no nudenet")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(TraceEraseError, match=r"trace-erase\[nudity\]"):
        NudeNetBackend()


def test_clip_backend_on_tiny_model(tiny_clip) -> None:
    clip = ClipBackend(tiny_clip)
    images = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")]
    labels = clip.zero_shot(images, ["cat", "dog"])
    assert labels.shape == (2,) and set(labels.tolist()) <= {0, 1}
    scores = clip.score(images, ["a photo of a cat", "a photo of a dog"])
    assert scores.shape == (2,) and (scores >= 0).all() and (scores <= 100).all()
    again = clip.score(images, ["a photo of a cat", "a photo of a dog"])
    assert np.allclose(scores, again)
    with pytest.raises(TraceEraseError, match="could not load CLIP model"):
        ClipBackend("/nonexistent/clip")


def test_prompt_files(tmp_path) -> None:
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,evaluation_seed,evaluation_guidance,categories\na dark alley,42,7.5,violence\n")
    rec = read_prompts(i2p)
    assert rec[0].prompt == "a dark alley" and rec[0].seed == 42 and rec[0].guidance == 7.5
    assert rec[0].label is None and rec[0].extra["categories"] == "violence"  # a category is not a class label
    mace = tmp_path / "mace.csv"
    mace.write_text("case_number,prompt,evaluation_seed,class\n0,a photo of a cat,7,cat\n")
    assert read_prompts(mace)[0].label == "cat"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,categories\nx,y\n")
    with pytest.raises(TraceEraseError, match="lacks the column\\(s\\) evaluation_seed, evaluation_guidance"):
        read_prompts(bad)
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": " A dog. "}]}))
    assert read_prompts(coco)[0].prompt == "A dog."
    with pytest.raises(TraceEraseError, match="does not exist"):
        read_prompts(tmp_path / "none.csv")


# ---- quality (torchmetrics) and the ImageNet-classifier backend ---------------------------------------------------
def test_fid_with_toy_features_separates_distributions(tmp_path) -> None:
    from trace_erase.evaluation.quality import fid, fids
    from trace_erase.toyworld.data import render_set

    a = render_set(5_000_000, 120, progress=False).images
    b = render_set(6_000_000, 120, progress=False).images
    noise = np.random.default_rng(0).integers(0, 255, a.shape, dtype=np.uint8)
    same, renders, far = fid(a, a), fid(a, b), fid(a, noise)
    assert abs(same) < 1e-3 and renders < far / 10
    assert fids(a, [b, noise]) == pytest.approx([renders, far], rel=1e-6)  # reference features kept across sets
    folder = tmp_path / "ref"
    folder.mkdir()
    for k, img in enumerate(a):
        Image.fromarray(img).save(folder / f"{k:04d}.png")
    assert fid(folder, b) == pytest.approx(renders, rel=1e-6)  # reference images by path


def test_fid_bad_inputs(tmp_path) -> None:
    from trace_erase.evaluation.quality import fid, fid_metric

    imgs = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(TraceEraseError, match="does not exist"):
        fid(tmp_path / "missing", imgs)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(TraceEraseError, match="cannot read image"):
        fid(tmp_path, imgs)
    with pytest.raises(TraceEraseError, match="unknown FID features"):
        fid_metric("vgg")
    with pytest.raises(TraceEraseError, match="--fid-weights"):
        fid_metric("inception", tmp_path / "nothing.pth")


def test_clip_score_through_torchmetrics_matches_backend(tiny_clip) -> None:
    from trace_erase.evaluation.quality import clip_score

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)  # the model's own size: no resampling differences
    prompts = ["a photo of a cat", "a red dog", "blue"]
    tm = clip_score(images, prompts, tiny_clip)
    clip = ClipBackend(tiny_clip)
    cos = (clip.image_features(list(images)) * clip.text_features(prompts)).sum(-1)
    assert tm == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-3)  # torchmetrics clamps the mean
    single = clip_score(images[:1], prompts[:1], tiny_clip)
    assert single == pytest.approx(float(ClipBackend(tiny_clip).score(list(images[:1]), prompts[:1])[0]), abs=1e-3)
    with pytest.raises(TraceEraseError, match="one prompt per image"):
        clip_score(images, prompts[:2], tiny_clip)


def test_fid_with_clip_features(tiny_clip) -> None:
    from trace_erase.evaluation.quality import fid

    rng = np.random.default_rng(2)
    a = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    assert abs(fid(a, a, features="clip", weights=tiny_clip)) < 1e-3
    assert fid(a, 255 - a, features="clip", weights=tiny_clip) > 0


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_imagenet_backend_loads_torchscript_by_path(tmp_path) -> None:
    from trace_erase.evaluation.backends import ImageNetBackend

    torch.manual_seed(0)
    net = _TinyNet().eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    (tmp_path / "labels.txt").write_text("\n".join(f"class{i}" for i in range(5)))
    backend = ImageNetBackend(path, labels=tmp_path / "labels.txt", image_size=48, allow_pickle=True)
    images = list(np.random.default_rng(0).integers(0, 255, (6, 40, 40, 3), dtype=np.uint8))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(backend.MEAN)[:, None, None]) / torch.tensor(backend.STD)[:, None, None]
    with torch.no_grad():
        expected = net(x).argmax(1).tolist()
    assert backend.predict(images) == expected
    assert backend.predict_names(images) == [f"class{i}" for i in expected]
    assert len(backend.identity["sha256"]) == 64


def test_imagenet_backend_bad_inputs(tmp_path, monkeypatch) -> None:
    import sys

    from trace_erase.evaluation.backends import ImageNetBackend

    with pytest.raises(TraceEraseError, match="not found"):
        ImageNetBackend(tmp_path / "missing.pt")
    torch.save(_TinyNet().state_dict(), tmp_path / "state.pth")
    with pytest.raises(TraceEraseError, match="runs code from the file; pass --allow-pickle"):
        ImageNetBackend(tmp_path / "state.pth")  # TorchScript runs code: refused without the opt-in
    with pytest.raises(TraceEraseError, match="not a TorchScript file"):
        ImageNetBackend(tmp_path / "state.pth", allow_pickle=True)
    with pytest.raises(TraceEraseError, match="pickle checkpoint"):
        ImageNetBackend(tmp_path / "state.pth", arch="resnet18")
    from safetensors.torch import save_file

    save_file(_TinyNet().state_dict(), tmp_path / "state.safetensors")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on torch 2.13 + PyPI torchvision: import fails
    with pytest.raises(TraceEraseError, match="needs a working torchvision"):
        ImageNetBackend(tmp_path / "state.safetensors", arch="resnet18")
