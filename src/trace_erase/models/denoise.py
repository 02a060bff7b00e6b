"""The denoising loop every trajectory the library samples itself goes through (stage B's replay pool, the attacks'
base-model references): the pipeline's own sampling loop, step for step, through the family adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import Conditioning, FamilyAdapter


def denoise(adapter: FamilyAdapter, scheduler: Any, x: torch.Tensor, cond: Conditioning, uncond: Conditioning,
            guidance: float,
            generator: torch.Generator | None = None,
            visit: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run ``scheduler`` (already set) from x_T = ``x`` as the pipeline's own ``__call__`` does: the same input
    scaling, model time and guidance semantics (the adapter's). ``visit(x_in, t)`` sees what the denoiser is fed at
    each step. Returns the final latents. No autograd graph."""
    step_kwargs = adapter.step_kwargs(scheduler, generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tm = adapter.model_time(t.reshape(1)).to(adapter.device).expand(x.shape[0])
            x_in = adapter.model_input(scheduler, x, t)
            if visit is not None:
                visit(x_in, tm)
            guided = adapter.guided_prediction(x_in, tm, cond, uncond, guidance)
            x = scheduler.step(guided, t, x, **step_kwargs, return_dict=False)[0]
    return x
