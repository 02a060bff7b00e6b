"""What the base model gives an optimising attack, computed before any erasure is applied: states along its own
sampling trajectories for the concept's prompts, its predictions there (AdvUnlearn's / P4D's target), and its
final latents (the "images of the concept" that textual inversion and UnlearnDiffAtk denoise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import ModelHandle
from ..models.denoise import denoise
from ..sampling import sampler_settings, sampling_scheduler


@dataclass
class Reference:
    """Base-model states (``[N, C, H, W]``, the denoiser's inputs), their model times and prompt indices, the base
    model's conditional prediction at each, and each trajectory's final latents with its prompt index."""

    prompts: list[str]
    states: torch.Tensor
    times: torch.Tensor
    state_prompt: torch.Tensor
    base_pred: torch.Tensor
    x0: torch.Tensor
    x0_prompt: torch.Tensor


def base_reference(handle: ModelHandle, prompts: list[str], trajectories: int, seed: int) -> Reference:
    """``trajectories`` trajectories of the model as it is now (call it before the erasure is applied), the prompts
    taken in turn, sampled with the evaluation sampler; their noise comes from seeds ``seed + 10_000 + j``, apart
    from the evaluation seeds."""
    adapter, pipe = handle.adapter, handle.pipe
    settings = sampler_settings(handle)
    which = [j % len(prompts) for j in range(trajectories)]
    batch = [prompts[j] for j in which]
    noise = torch.stack([torch.randn(adapter.latent_shape(1)[1:],
                                     generator=torch.Generator().manual_seed(seed + 10_000 + j))
                         for j in range(trajectories)])
    states, times, preds = [], [], []
    with torch.no_grad():
        cond, uncond = adapter.conditioning(batch), adapter.conditioning([""] * len(batch))

    def keep(x_in: torch.Tensor, tm: torch.Tensor) -> None:
        states.append(x_in.detach())
        times.append(tm.detach())
        preds.append(adapter.predict(x_in, tm, cond).detach())

    with sampling_scheduler(pipe, settings["scheduler_name"]):
        scheduler = adapter.rollout_scheduler(settings["steps"])
        x = adapter.initial_noise(scheduler, noise)
        x0 = denoise(adapter, scheduler, x, cond, uncond, settings["guidance"], None, keep)
    steps = len(states)
    idx = torch.tensor(which).repeat(steps)
    return Reference(prompts=list(prompts), states=torch.cat(states), times=torch.cat(times), state_prompt=idx,
                     base_pred=torch.cat(preds), x0=x0.detach(), x0_prompt=torch.tensor(which))
