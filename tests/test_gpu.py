"""The path a user runs on a GPU: CUDA, bf16, text encoders offloaded. Skipped without a CUDA device (CI has none);
run on a GPU machine with ``pytest -s tests/test_gpu.py`` (it prints the agreement figures it asserts on)."""

from __future__ import annotations

import pytest
import torch

from trace_erase import erase
from trace_erase.cli import main
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.models import load_model
from trace_erase.runtime import Runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CF = {"templates": ["{}", "a photo of {}"]}
TRAIN = {"steps": 12, "lr": 3e-3, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2,
         "checkpoint_every": 1000}


def _delta(er) -> torch.Tensor:
    return torch.cat([d.float().cpu().flatten() for _, d in sorted(er.deltas().items())])


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative error of a against b)."""
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return cos, float((a - b).norm() / b.norm())


def test_auto_means_the_gpu_in_bf16() -> None:
    rt = Runtime()
    assert rt.torch_device.type == "cuda" and rt.torch_dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "sd3"])
def test_closed_form_on_the_gpu_is_the_cpu_edit(family, saved_models) -> None:
    """Same precision, other device: every family's encoding, statistics and solve give the CPU's edit on CUDA, and
    the base model is not modified in place."""
    gpu = load_model(saved_models[family], device="cuda", dtype="fp32")
    before = {n: p.detach().clone() for n, p in gpu.adapter.denoiser.named_parameters()}
    eg = erase(gpu, ["cat"], method="trace-closed-form", progress=False, **CF)
    ec = erase(load_model(saved_models[family], device="cpu", dtype="fp32"), ["cat"], method="trace-closed-form",
               progress=False, **CF)
    cos, rel = _agreement(_delta(eg), _delta(ec))
    print(f"\n[{family}] closed form, cuda fp32 vs cpu fp32: cos {cos:.6f}, relative error {rel:.5f}")
    assert eg.manifest["runtime"]["resolved_device"].startswith("cuda")
    assert cos > 0.999 and rel < 0.05, (cos, rel)
    after = dict(gpu.adapter.denoiser.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("model", ["toy-sd", "toy-flux"])
def test_closed_form_in_bf16_on_the_gpu_agrees_with_fp32(model) -> None:
    """The statistics and solve run in fp32 whatever the model's dtype: a trained model in bf16 on the GPU gives the
    fp32 CPU edit up to bf16 rounding of its encodings (on the CPU: cos 0.997, relative error 0.07-0.08; random tiny
    models are no judge here, their prompt encodings nearly coincide and rounding dominates their differences)."""
    eg = erase(load_model(model, device="cuda", dtype="bf16"), ["circle"], method="trace-closed-form", progress=False)
    ec = erase(load_model(model, device="cpu", dtype="fp32"), ["circle"], method="trace-closed-form", progress=False)
    assert eg.manifest["runtime"]["resolved_dtype"] == "bf16"
    cos, rel = _agreement(_delta(eg), _delta(ec))
    print(f"\n[{model}] closed form, cuda bf16 vs cpu fp32: cos {cos:.5f}, relative error {rel:.4f}")
    assert cos > 0.99 and rel < 0.15, (cos, rel)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_trajectory_on_the_gpu_is_the_cpu_training(family, saved_models) -> None:
    """Same precision, other device: stage B on CUDA trains the CPU's LoRA (SD measured on an H200: cos 0.9998)."""
    eg = erase(load_model(saved_models[family], device="cuda", dtype="fp32"), ["cat"], method="esd-x", anchor="dog",
               progress=False, **TRAIN)
    ec = erase(load_model(saved_models[family], device="cpu", dtype="fp32"), ["cat"], method="esd-x", anchor="dog",
               progress=False, **TRAIN)
    cos, rel = _agreement(_delta(eg), _delta(ec))
    print(f"\n[{family}] esd-x 12 steps, cuda fp32 vs cpu fp32: cos {cos:.5f}, relative error {rel:.4f}")
    assert cos > 0.99, cos


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("kernels", ["auto", "math"])
def test_bf16_training_on_the_gpu_stays_finite_with_fp32_lora(family, kernels, saved_models) -> None:
    """Stage B in bf16 on CUDA: fp32 LoRA weights on the GPU over a frozen bf16 base, and finite gradients. Under
    torch's own kernel choice an H200 gave FLUX NaN gradients at step 0 (cuDNN's attention backward); ``auto``
    excludes that kernel and falls back to ``math`` (the reference one) at a step whose gradients are not finite.
    (Agreement with fp32 is not asserted on these random tiny models: their prompt encodings nearly coincide, so bf16
    rounding decides the direction — cos 0.7-0.9 on both CPU and GPU.)"""
    gpu = load_model(saved_models[family], device="cuda", dtype="bf16")
    eng = TrajectoryEngine(gpu.adapter, TrajectoryConfig.from_options(**TRAIN), progress=False)
    eng.attach()
    try:
        params = eng.lora_parameters()
        assert params and all(p.dtype == torch.float32 and p.is_cuda for p in params)
        assert eng.adapter.module(eng.targets[0]).weight.dtype == torch.bfloat16
    finally:
        eng.detach()
    er = erase(gpu, ["cat"], method="esd-x", anchor="dog", progress=False, attention_kernels=kernels, **TRAIN)
    # auto recomputes a step with non-finite gradients under the math kernel: say whether it had to
    print(f"\n[{family} {kernels}] attention fallback: {er.manifest['trajectory_log'].get('attention_fallback')}")
    assert all(torch.isfinite(torch.tensor(v)) for v in er.manifest["trajectory_log"]["final_losses"].values())
    assert all(torch.isfinite(v).all() for v in er.state_dict.values())


@pytest.mark.parametrize(("model", "dtype", "min_cos"), [("sd", "fp32", 0.9999), ("toy-sd", "bf16", 0.99)])
def test_offloaded_text_encoders_give_the_same_erasure(model, dtype, min_cos, saved_models) -> None:
    """--offload text-encoders keeps the encoders in CPU memory while the denoiser is on the GPU; the edit is the one
    computed with everything on the GPU (H200: fp32 cos 1.0; toy-sd bf16 0.997, where the encoders' bf16 kernels
    differ between CPU and GPU — the offloaded edit equals the all-CPU bf16 one exactly)."""
    path, concept, kw = (saved_models[model], "cat", CF) if model == "sd" else (model, "circle", {})
    off = load_model(path, device="cuda", dtype=dtype, offload="text-encoders")
    on = load_model(path, device="cuda", dtype=dtype)
    e_off = erase(off, [concept], method="trace-closed-form", progress=False, **kw)
    e_on = erase(on, [concept], method="trace-closed-form", progress=False, **kw)
    assert next(off.pipe.text_encoder.parameters()).device.type == "cpu"
    assert next(off.adapter.denoiser.parameters()).is_cuda
    cos, rel = _agreement(_delta(e_off), _delta(e_on))
    print(f"\n[{model} {dtype}] offloaded vs on-GPU text encoders: cos {cos:.6f}, relative error {rel:.5f}")
    assert cos > min_cos, cos
    er = erase(off, [concept], method="esd-x", anchor="dog", progress=False, **{**TRAIN, "steps": 3})
    assert all(torch.isfinite(torch.tensor(v)) for v in er.manifest["trajectory_log"]["final_losses"].values())


def test_gated_trace_erasure_changes_a_plain_gpu_pipeline_call(saved_models) -> None:
    """A gated TRACE erasure applied to a bf16 GPU pipeline changes ``pipe(prompt)`` (its gate reads CUDA timesteps),
    and at scale 0 gives the base model's image back."""
    handle = load_model(saved_models["sd"], device="cuda", dtype="bf16")
    er = erase(handle, ["cat"], method="trace", progress=False, gate_tau=0.5, **{**TRAIN, **CF, "steps": 6})
    assert er.gated_state_dict is not None

    def image() -> torch.Tensor:
        g = torch.Generator("cuda").manual_seed(0)
        return handle.pipe("a photo of a cat", num_inference_steps=4, generator=g, output_type="pt").images.float()

    base = image()
    applied = er.apply(handle, scale=1.0)
    erased = image()
    assert {w for _, w in applied.gate.history} == {0.0, 1.0}  # off in early steps, on in late ones
    er.apply(handle, scale=0.0)
    off = image()
    print(f"\n[sd] gated trace on cuda: |erased - base| {float((erased - base).abs().max()):.4f}, "
          f"|scale 0 - base| {float((off - base).abs().max()):.5f}")
    assert float((erased - base).abs().max()) > 1e-3
    assert float((off - base).abs().max()) < 1e-2


def test_cli_erase_and_generate_on_the_gpu(tmp_path, saved_models) -> None:
    out, gen = tmp_path / "e", tmp_path / "g"
    assert main(["erase", "--model", saved_models["sdxl"], "--concept", "cat", "--output", str(out),
                 "--method", "trace-closed-form", "--device", "cuda", "--dtype", "bf16"]) == 0
    assert main(["generate", "--model", saved_models["sdxl"], "--erasure", str(out), "--prompt", "a photo of a cat",
                 "--output", str(gen), "--steps", "2", "--device", "cuda"]) == 0
    assert list(gen.glob("*.png"))
