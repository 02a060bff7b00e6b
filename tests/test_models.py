"""Family detection, loading from folders, and the loader's refusals."""

from __future__ import annotations

import shutil

import pytest
import torch

from trace_erase import TraceEraseError, get_adapter, load_model
from trace_erase.models.loading import load_pipeline, resolve_model

from .conftest import BUILDERS

EXPECTED = {
    "sd": ("sd", "epsilon", "ddpm"),
    "sd2v": ("sd", "v_prediction", "ddpm"),
    "sdxl": ("sdxl", "epsilon", "ddpm"),
    "flux": ("flux", "flow", "flow"),
    "sd3": ("sd3", "flow", "flow"),
    "sd35": ("sd3", "flow", "flow"),
    "sd3-no-t5": ("sd3", "flow", "flow"),
}


def test_family_detection_and_predict(family_pipe) -> None:
    name, pipe = family_pipe
    adapter = get_adapter(pipe)
    assert (adapter.family, adapter.prediction_type, adapter.time_kind) == EXPECTED[name]
    feats = adapter.encode_text(["a photo of a cat", ""])
    assert feats["tokens"].shape[:2] == (2, adapter.sequence_length)
    streams = adapter.text_streams()
    assert streams and all(adapter.module(m).weight.ndim == 2 for s in streams for m in s.modules)
    x = torch.randn(adapter.latent_shape(2))
    t = torch.tensor([900, 10]) if adapter.time_kind == "ddpm" else torch.tensor([0.9, 0.01]) * adapter.time_scale
    with torch.no_grad():
        out = adapter.predict(x, t, adapter.conditioning(["a cat", ""]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert adapter.lora_target_modules("kv")


def test_load_saved_folder_and_sidecar(saved_models, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(saved_models["flux"], folder)
    (folder / "trace_erase.json").write_text('{"sampler": {"resolution": 16, "steps": 4, "guidance": 2.0}}')
    handle = load_model(str(folder))
    assert handle.adapter.family == "flux" and handle.adapter.resolution == 16
    assert handle.adapter.latent_shape(1)[-1] == 8


def test_unsupported_architecture_lists_supported(tmp_path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(TraceEraseError, match="unsupported architecture.*supported: SD1.x"):
        load_model(str(tmp_path / "ddpm"))


def test_bad_model_paths(tmp_path) -> None:
    with pytest.raises(TraceEraseError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceEraseError, match="not a diffusers pipeline folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(TraceEraseError, match="unknown toy model 'toy-xyz'; available: toy-flux, toy-sd"):
        resolve_model("toy-xyz")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(TraceEraseError, match="pickle"):
        resolve_model(str(tmp_path / "model.ckpt"))


def test_unreachable_hub_id_gives_one_line_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TraceEraseError, match="not reachable on the Hugging Face Hub") as info:
        load_pipeline("nobody-xyz/not-a-model")
    assert "\n" not in str(info.value)


def test_pickle_weights_refused_unless_allowed(tmp_path) -> None:
    pipe = BUILDERS["sd"]()
    pipe.save_pretrained(tmp_path / "pk", safe_serialization=False)
    with pytest.raises(TraceEraseError, match="only as pickle.*--allow-pickle"):
        load_pipeline(str(tmp_path / "pk"))
    loaded = load_pipeline(str(tmp_path / "pk"), allow_pickle=True)
    assert get_adapter(loaded).family == "sd"
