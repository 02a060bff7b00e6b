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
from trace_erase.models.tokenizers import build_clip_tokenizer


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


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = build_clip_tokenizer(("a", "photo", "of", "cat", "dog", "red", "blue"), max_length=16)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


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
    assert rec[0].label == "violence"
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
