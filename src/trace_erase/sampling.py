"""Image generation with a pipeline's own ``__call__``, with per-family defaults and per-image seeds."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .models import ModelHandle

FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    # the paper line's evaluation settings (spec): DDIM 50 / 7.5 for SD, 28 / 3.5 for FLUX-dev
    "sd": {"steps": 50, "guidance": 7.5},
    "sdxl": {"steps": 50, "guidance": 7.5},
    "flux": {"steps": 28, "guidance": 3.5},
}


def sampler_settings(handle: ModelHandle, steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """Steps, guidance and resolution to sample with: explicit values, else the model's recorded defaults."""
    family = handle.adapter.family
    base = {**FAMILY_DEFAULTS[family], **handle.defaults}
    scale = handle.pipe.vae_scale_factor
    resolution = int(base.get("resolution") or handle.adapter.latent_shape(1)[-1] * scale)
    return {
        "steps": int(steps if steps is not None else base["steps"]),
        "guidance": float(guidance if guidance is not None else base["guidance"]),
        "resolution": resolution,
        "scheduler": type(handle.pipe.scheduler).__name__,
    }


def generate_images(
    handle: ModelHandle,
    prompts: list[str],
    seeds: list[int],
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **call_kwargs: Any,
) -> list[Any]:
    """One PIL image per (prompt, seed) pair, each from its own ``torch.Generator`` so batching changes nothing."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    settings = sampler_settings(handle, steps, guidance)
    pipe = handle.pipe
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance"],
        "height": settings["resolution"],
        "width": settings["resolution"],
        **call_kwargs,
    }
    if handle.adapter.family == "flux":
        kwargs["max_sequence_length"] = handle.adapter.max_tokens
        if not handle.adapter.denoiser.config.guidance_embeds:
            # no distilled guidance input (like our toy-flux): classifier-free guidance against the empty prompt
            kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
            kwargs["guidance_scale"] = 1.0
    callbacks = list(handle.step_callbacks)
    if callbacks:
        def on_step_end(pipe_: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            for cb in callbacks:
                kw = cb(pipe_, i, t, kw)
            return kw

        kwargs["callback_on_step_end"] = on_step_end
    images: list[Any] = []
    device = handle.adapter.device
    for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        chunk_p, chunk_s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk_s]
        latents = torch.stack([torch.randn(handle.adapter.latent_shape(1)[1:], generator=g) for g in gens])
        if handle.adapter.family == "flux":
            b, c, h, w = latents.shape
            latents = type(pipe)._pack_latents(latents, b, c, h, w)
        with torch.no_grad():
            for cb in callbacks:
                if hasattr(cb, "prepare"):
                    cb.prepare(settings["steps"])
            if "true_cfg_scale" in kwargs:
                kwargs["negative_prompt"] = [""] * len(chunk_p)
            out = pipe(prompt=chunk_p, latents=latents.to(device, handle.adapter.dtype), **kwargs)
        images.extend(out.images)
    return images
