"""The runtime setting (device, dtype, offload, batch size), half-precision training and what gets recorded."""

from __future__ import annotations

import json

import pytest
import torch

from trace_erase import erase, get_adapter, load_model
from trace_erase.cli import main
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.errors import TraceEraseError
from trace_erase.models.registry import adapter_class
from trace_erase.runtime import Runtime

from .conftest import BUILDERS


# ---- validation: one line each, before any model loads ------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("fields", "message"), [
    ({"device": "cuda"}, "--device cuda is not available"),
    ({"device": "cuda:3"}, "--device cuda:3 is not available"),
    ({"device": "tpu"}, "unknown --device 'tpu'"),
    ({"device": "mps"} if not torch.backends.mps.is_available() else {"device": "xla"}, "not available|unknown"),
    ({"dtype": "fp8"}, "unknown --dtype 'fp8'"),
    ({"offload": "disk"}, "unknown --offload 'disk'"),
    ({"offload": "model", "device": "cpu"}, "--offload model moves models off an accelerator"),
    ({"offload": "text-encoders"}, "--offload text-encoders moves models off an accelerator"),
    ({"batch_size": 0}, "--batch-size must be ≥ 1"),
])
def test_bad_runtime_settings_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(TraceEraseError, match=message):
        Runtime(**fields)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means the GPU there")
def test_auto_is_fp32_on_the_cpu_and_fp16_cannot_train_there() -> None:
    rt = Runtime()
    assert rt.torch_device == torch.device("cpu") and rt.torch_dtype == torch.float32
    assert Runtime(dtype="bf16").torch_dtype == torch.bfloat16
    with pytest.raises(TraceEraseError, match="fp16 cannot train on the CPU"):
        Runtime(dtype="fp16").check_training()
    pipe = BUILDERS["sd"]().to(torch.float16)
    with pytest.raises(TraceEraseError, match="fp16 cannot train on the CPU"):  # the API refuses it too
        erase(pipe, ["cat"], method="esd-x", progress=False, steps=1)


def test_generation_batch_fits_the_resolution() -> None:
    rt = Runtime(device="cpu")
    assert rt.generation_batch(adapter_class("sd").batch_pixels, 512) == 8
    assert rt.generation_batch(adapter_class("sdxl").batch_pixels, 1024) == 2
    assert rt.generation_batch(adapter_class("flux").batch_pixels, 1024) == 1
    assert rt.generation_batch(adapter_class("sd").batch_pixels, 32) == 64  # toy sizes: capped
    assert Runtime(device="cpu", batch_size=3).generation_batch(adapter_class("flux").batch_pixels, 1024) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["erase", "--model", "toy-sd", "--concept", "circle", "--output", "{out}", "--device", "cuda"],
    ["erase", "--model", "toy-sd", "--concept", "circle", "--method", "trace", "--output", "{out}",
     "--dtype", "fp16"],
    ["generate", "--model", "toy-sd", "--prompt", "a circle", "--output", "{out}", "--batch-size", "0"],
    ["generate", "--model", "toy-sd", "--prompt", "a circle", "--output", "{out}", "--scheduler", "lms"],
    ["eval", "--model", "toy-sd", "--concept", "circle", "--output", "{out}", "--offload", "model"],
    ["eval", "--model", "toy-flux", "--concept", "circle", "--output", "{out}", "--scheduler", "ddim"],
    ["bench", "--model", "toy-sd", "--output", "{out}", "--dtype", "float8"],
    ["demo", "--output", "{out}", "--device", "cuda:1"],
    ["merge", "--model", "toy-sd", "--erasure", "{out}", "--output", "{out}2", "--device", "cuda"],
    ["toyworld", "check", "--device", "cuda"],
])
def test_cli_runtime_errors_are_one_line_exit_2(argv: list[str], tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    assert main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


# ---- half precision: fp32 trainable weights over a bf16 base --------------------------------------------------------
TRAIN = {"steps": 12, "lr": 3e-3, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2,
         "checkpoint_every": 1000}


def _delta(er) -> torch.Tensor:
    return torch.cat([d.flatten() for _, d in sorted(er.deltas().items())])


def test_bf16_training_keeps_fp32_lora_and_agrees_with_fp32() -> None:
    pipe16 = BUILDERS["sd"]().to(torch.bfloat16)
    eng = TrajectoryEngine(get_adapter(pipe16), TrajectoryConfig.from_options(**TRAIN), progress=False)
    eng.attach()
    try:
        assert eng.lora_parameters() and all(p.dtype == torch.float32 for p in eng.lora_parameters())
        assert eng.adapter.module(eng.targets[0]).weight.dtype == torch.bfloat16  # the frozen base stays bf16
        a0 = {n: p.detach().clone() for n, p in pipe16.unet.named_parameters() if "lora_A" in n}
    finally:
        eng.detach()
    er16 = erase(pipe16, ["cat"], method="esd-x", anchor="dog", progress=False, **TRAIN)
    er32 = erase(BUILDERS["sd"](), ["cat"], method="esd-x", anchor="dog", progress=False, **TRAIN)
    losses = er16.manifest["trajectory_log"]["final_losses"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert er16.manifest["runtime"]["dtype"] == "bfloat16"
    # the small AdamW updates of A survive (in bf16 parameters, updates below 2⁻⁸ of a weight are lost)
    moved = [(er16.state_dict[f"unet.{n.replace('.lora_A.trace_erase_train.weight', '')}.lora_A.weight"]
              - a.float()).abs().max() for n, a in a0.items()]
    assert min(moved) > 1e-4
    d16, d32 = _delta(er16), _delta(er32)
    cos = float(torch.nn.functional.cosine_similarity(d16, d32, dim=0))
    assert d32.norm() > 0 and cos > 0.8, cos


# ---- what a command records ----------------------------------------------------------------------------------------
def test_runtime_and_sampler_are_recorded(tmp_path, saved_models) -> None:
    out = tmp_path / "gen"
    assert main(["generate", "--model", saved_models["sd"], "--prompt", "a photo of a cat", "--output", str(out),
                 "--steps", "2", "--scheduler", "euler", "--device", "cpu", "--batch-size", "1"]) == 0
    rec = json.loads((out / "generation.json").read_text())
    assert rec["scheduler"] == "EulerDiscreteScheduler" and rec["batch_size"] == 1
    assert rec["runtime"]["resolved_device"] == "cpu" and rec["runtime"]["resolved_dtype"] == "fp32"
    handle = load_model(saved_models["sd"], device="cpu")
    assert type(handle.pipe.scheduler).__name__ == "DDIMScheduler"  # the folder's scheduler is put back


def test_evaluation_switches_an_sd_folder_to_ddim(tmp_path, saved_models) -> None:
    """SD-1.4 folders ship PNDM; evaluation samples with DDIM (the protocol's), says so, and leaves the pipeline's own
    scheduler in place for training."""
    from diffusers import PNDMScheduler

    from trace_erase.sampling import generate_images, sampler_settings

    handle = load_model(saved_models["sd"], device="cpu")
    handle.pipe.scheduler = PNDMScheduler.from_config(handle.pipe.scheduler.config, skip_prk_steps=True)
    used: list[str] = []
    handle.adapter.denoiser.register_forward_pre_hook(
        lambda m, a: used.append(type(handle.pipe.scheduler).__name__))
    generate_images(handle, ["a photo of a cat"], [0], steps=2, progress=False)
    assert set(used) == {"DDIMScheduler"}
    assert type(handle.pipe.scheduler).__name__ == "PNDMScheduler"
    assert sampler_settings(handle)["scheduler"] == "DDIMScheduler"
    assert sampler_settings(handle, scheduler="model")["scheduler"] == "PNDMScheduler"


def test_merge_writes_the_base_models_dtype(tmp_path, saved_models) -> None:
    """A bf16 base stays bf16 after merge (it was written as fp32, doubling the size)."""
    from safetensors import safe_open

    base16 = tmp_path / "base16"
    pipe = BUILDERS["sd"]().to(torch.bfloat16)
    pipe.save_pretrained(base16)
    er = erase(load_model(str(base16), device="cpu", dtype="fp32"), ["cat"], progress=False,
               templates=["{}", "a photo of {}"])
    er.save(tmp_path / "e")
    assert main(["merge", "--model", str(base16), "--erasure", str(tmp_path / "e"), "--output",
                 str(tmp_path / "merged"), "--device", "cpu"]) == 0
    with safe_open(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("attn2.to_k.weight"))
        assert f.get_slice(key).get_dtype() == "BF16"
        merged_k = f.get_tensor(key).float()
    with safe_open(str(base16 / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        base_k = f.get_tensor(key).float()
    assert (merged_k - base_k).abs().max() > 1e-3  # the erasure is in it
