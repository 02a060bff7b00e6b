"""Stage B sees what the pipeline's own ``__call__`` feeds the denoiser: scheduler, input scaling, guidance semantics.

Each case builds a tiny real-class pipeline, samples it with its own ``__call__`` and compares with the trajectory
engine's rollout from the same initial noise (final latents) and with the inputs of one training step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trace_erase import get_adapter
from trace_erase.engines.pool import Pool, Trajectory
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.models.builders import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

STEPS, GUIDANCE, PROMPT = 6, 4.0, "a photo of a cat"


def _euler(pipe: Any) -> Any:
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


CASES = {
    "sd-ddim": lambda: tiny_sd_pipeline(0),
    "sd-euler": lambda: _euler(tiny_sd_pipeline(0)),
    "sd2v-euler": lambda: _euler(tiny_sd_pipeline(0, prediction_type="v_prediction")),
    "sdxl-euler": lambda: tiny_sdxl_pipeline(0),
    "flux-guidance-embeds": lambda: tiny_flux_pipeline(0, guidance_embeds=True),
    "flux-true-cfg": lambda: tiny_flux_pipeline(0, guidance_embeds=False),
    "sd3": lambda: tiny_sd3_pipeline(0),
    "sd35": lambda: tiny_sd3_pipeline(0, variant="sd35"),
}


def _engine(pipe: Any) -> TrajectoryEngine:
    cfg = TrajectoryConfig.from_options(rollout_steps=STEPS, rollout_guidance=GUIDANCE, batch_size=4, steps=1)
    return TrajectoryEngine(get_adapter(pipe), cfg, progress=False)


def _denoiser_inputs(module: torch.nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """Record (latents, timestep) of every denoiser call (UNet: positional; FLUX: keywords)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append((x.detach().clone(), torch.as_tensor(t).detach().float().reshape(-1).expand(x.shape[0]).clone()))

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _pipeline_call(pipe: Any, adapter: Any, noise: torch.Tensor) -> torch.Tensor:
    """The pipeline's own sampling from ``noise`` (FLUX takes it packed); returns latents as the pipeline holds them."""
    kwargs: dict[str, Any] = {**adapter.pipeline_guidance(GUIDANCE, 1), **adapter.pipeline_kwargs()}
    latents = adapter.pipeline_latents(noise)
    _, _, height, width = (side * pipe.vae_scale_factor for side in adapter.latent_shape(1))
    with torch.no_grad():
        return pipe(PROMPT, latents=latents, num_inference_steps=STEPS, height=height, width=width,
                    output_type="latent", **kwargs).images


def _as_pipeline_holds(adapter: Any, pipe: Any, x: torch.Tensor) -> torch.Tensor:
    return adapter.pipeline_latents(x)


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_equals_the_pipelines_own_sampling(case: str) -> None:
    pipe = CASES[case]()
    eng = _engine(pipe)
    noise = torch.randn(eng.adapter.latent_shape(1), generator=torch.Generator().manual_seed(3))
    _, _, final = eng.rollout(PROMPT, noise=noise)
    expected = _pipeline_call(pipe, eng.adapter, noise)
    got = _as_pipeline_holds(eng.adapter, pipe, final)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-4, float((got - expected).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_feeds_the_denoiser_the_pipelines_inputs(case: str) -> None:
    """Every denoiser input of one training step (stage-A and live branches) equals the input the pipeline fed at the
    step with the same timestep (for Euler the scaled x/√(σ²+1), not the scheduler's x)."""
    pipe = CASES[case]()
    eng = _engine(pipe)
    adapter = eng.adapter
    noise = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(3))
    seen, handle = _denoiser_inputs(adapter.denoiser)
    try:
        _pipeline_call(pipe, adapter, noise)
        fed = [(x[0], t[0]) for x, t in seen]  # the pipeline's input at each step (rows of a CFG batch agree)
        seen.clear()
        states, times, _ = eng.rollout(PROMPT, noise=noise)
        seen.clear()
        pool = Pool([Trajectory(states, times, PROMPT)])
        eng.attach()
        try:
            x, t, prompts = eng.sample(pool)
            eng.loss_terms(x, t, prompts, [], backward_scale=1.0)
        finally:
            eng.detach()
    finally:
        handle.remove()
    assert len(seen) >= 2  # the frozen call and the live branch(es)
    matched = 0
    for x_batch, t_batch in seen:
        for x_row, t_row in zip(x_batch, t_batch, strict=True):
            step = [k for k, (_, t_fed) in enumerate(fed) if torch.isclose(t_fed, t_row, rtol=0, atol=1e-6)]
            assert step, f"training timestep {float(t_row)} is not one the pipeline used"
            diff = (x_row.float() - fed[step[0]][0].float()).abs().max()
            assert diff <= 1e-4, (float(t_row), float(diff))
            matched += 1
    assert matched >= 4


def test_euler_inputs_are_scaled_not_raw() -> None:
    """The pool of an Euler rollout holds x/√(σ²+1): its first state has unit scale, while the scheduler's x_T has
    scale √(σ_max²+1) ≈ 14 for SD's schedule (the defect this guards against)."""
    pipe = CASES["sd-euler"]()
    eng = _engine(pipe)
    states, _, _ = eng.rollout(PROMPT, noise=torch.randn(eng.adapter.latent_shape(1),
                                                        generator=torch.Generator().manual_seed(0)))
    sched = eng.adapter.rollout_scheduler(STEPS)
    assert float(sched.init_noise_sigma) > 10
    assert 0.7 < float(states[0].std()) < 1.3


@pytest.mark.parametrize("case", ["sd-euler", "sdxl-euler", "flux-guidance-embeds"])
def test_bf16_rollout_matches_the_bf16_pipeline(case: str) -> None:
    """In half precision too the rollout rounds as the pipeline does (x_T cast before the init-sigma scale, FLUX's
    timestep cast before /1000): same final latents from the same noise."""
    pipe = CASES[case]().to(torch.bfloat16)
    eng = _engine(pipe)
    noise = torch.randn(eng.adapter.latent_shape(1), generator=torch.Generator().manual_seed(3))
    _, _, final = eng.rollout(PROMPT, noise=noise)
    expected = _pipeline_call(pipe, eng.adapter, noise.to(torch.bfloat16)).float()
    got = _as_pipeline_holds(eng.adapter, pipe, final).float()
    assert final.dtype == torch.bfloat16
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_nonsquare_flux_rollout_equals_the_pipelines_own_sampling(guidance_embeds: bool) -> None:
    """64 wide × 32 high (the toy scene pictures' size), with FLUX.1-dev's resolution-dependent shift: the 2×2
    packing, the image ids (8 × 16 patches) and the shift's sequence length (128 tokens, not 16²) are the
    pipeline's, so the rollout ends where the pipeline's own sampling does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_flux_pipeline(0, guidance_embeds=guidance_embeds)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    adapter = get_adapter(pipe, {"height": 32, "width": 64})
    assert adapter.latent_shape(2) == (2, 4, 16, 32)
    cfg = TrajectoryConfig.from_options(rollout_steps=STEPS, rollout_guidance=GUIDANCE, batch_size=4, steps=1)
    eng = TrajectoryEngine(adapter, cfg, progress=False)
    noise = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(3))
    _, _, final = eng.rollout(PROMPT, noise=noise)
    expected = _pipeline_call(pipe, adapter, noise)
    got = _as_pipeline_holds(adapter, pipe, final)
    assert got.shape == expected.shape == (1, 8 * 16, 16)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-4, float((got - expected).abs().max())
    # the shift follows the token count: a square picture as wide steps at other sigmas
    square = get_adapter(pipe, {"resolution": 64})
    assert not torch.allclose(adapter.rollout_scheduler(STEPS).sigmas, square.rollout_scheduler(STEPS).sigmas)
