"""Image generation with a pipeline's own ``__call__``, with per-family defaults and per-image seeds."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import TraceEraseError
from .models import ModelHandle
from .models.registry import adapter_class

# --scheduler names → diffusers classes ("model": the scheduler saved with the pipeline)
SCHEDULERS: dict[str, str | None] = {
    "model": None,
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}

def check_scheduler(name: str | None, family: str | None = None) -> None:
    """One line for an unknown scheduler name, or one the family cannot sample with."""
    if name is None:
        return
    if name not in SCHEDULERS:
        raise TraceEraseError(f"unknown --scheduler '{name}'; choose {', '.join(SCHEDULERS)}")
    if family is not None and not adapter_class(family).accepts_scheduler(name):
        raise TraceEraseError(f"{family} samples with its own flow-matching scheduler; use --scheduler model")


def sampler_settings(handle: ModelHandle, steps: int | None = None, guidance: float | None = None,
                     scheduler: str | None = None) -> dict[str, Any]:
    """Steps, guidance, scheduler, resolution and runtime to sample with: explicit values, else the family's
    evaluation defaults, overridden by the model's recorded ones (the toy sidecars). ``height`` and ``width`` are the
    picture's; ``resolution`` is their common side, or ``"WxH"`` for a non-square model (a sidecar records
    ``resolution``, or ``height`` and ``width``)."""
    family = handle.adapter.family
    base = {**handle.adapter.sampler_defaults, **handle.defaults}
    name = scheduler or base["scheduler"]
    check_scheduler(name, family)
    scale = handle.pipe.vae_scale_factor
    shape = handle.adapter.latent_shape(1)
    height = int(base.get("height") or base.get("resolution") or shape[-2] * scale)
    width = int(base.get("width") or base.get("resolution") or shape[-1] * scale)
    cls = SCHEDULERS[name] or type(handle.pipe.scheduler).__name__
    return {
        "steps": int(steps if steps is not None else base["steps"]),
        "guidance": float(guidance if guidance is not None else base["guidance"]),
        "resolution": height if height == width else f"{width}x{height}",
        "height": height,
        "width": width,
        "scheduler": cls,
        "scheduler_name": name,
        "batch_size": handle.runtime.generation_batch(handle.adapter.batch_pixels, height, width),
        "runtime": handle.runtime.describe(),
    }


@contextlib.contextmanager
def sampling_scheduler(pipe: Any, name: str) -> Iterator[None]:
    """Sample with scheduler ``name`` (built from the pipeline's own scheduler config, as diffusers' docs do) and put
    the pipeline's scheduler back afterwards: training rollouts keep following the model's own."""
    cls_name = SCHEDULERS[name]
    original = pipe.scheduler
    if cls_name is not None and type(original).__name__ != cls_name:
        import diffusers

        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def generate_images(
    handle: ModelHandle,
    prompts: list[str],
    seeds: list[int],
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    scheduler: str | None = None,
    cache: str | Path | None = None,
    embeds: Callable[[list[str]], dict[str, Any]] | None = None,
    **call_kwargs: Any,
) -> list[Any]:
    """One PIL image per (prompt, seed) pair, each from its own ``torch.Generator`` so batching changes nothing.

    ``batch_size`` defaults to the runtime's (what fits a 24 GB card at this resolution). With ``cache`` each batch is
    saved there as PNGs when it is done (keyed by its prompts, seeds and sampler settings), and batches found there
    are read back instead of drawn again: an interrupted run resumes bit-identically (same batch composition).
    ``embeds(chunk_prompts)`` replaces the prompts by the pipeline's ``prompt_embeds`` arguments for each batch
    (:meth:`~trace_erase.models.base.FamilyAdapter.pipeline_embeds`): conditioning-level attacks generate this way."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    settings = sampler_settings(handle, steps, guidance, scheduler)
    batch_size = int(batch_size or settings["batch_size"])
    pipe, adapter = handle.pipe, handle.adapter
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings["steps"],
        "height": settings["height"],
        "width": settings["width"],
        **adapter.pipeline_kwargs(),
        **call_kwargs,
    }
    images: list[Any] = []
    handle.phase("generate")
    try:
        with sampling_scheduler(pipe, settings["scheduler_name"]), torch.no_grad():
            for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
                chunk_p, chunk_s = prompts[i : i + batch_size], seeds[i : i + batch_size]
                chunk_dir = _chunk_dir(cache, chunk_p, chunk_s, settings, call_kwargs) if cache else None
                if chunk_dir is not None and (chunk_dir / "done").is_file():
                    images.extend(_read_chunk(chunk_dir, len(chunk_p)))
                    continue
                gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk_s]
                latents = adapter.pipeline_latents(
                    torch.stack([torch.randn(adapter.latent_shape(1)[1:], generator=g) for g in gens]))
                guidance_kwargs = adapter.pipeline_guidance(settings["guidance"], len(chunk_p))
                text: dict[str, Any] = {"prompt": chunk_p}
                if embeds is not None:
                    text = embeds(chunk_p)
                    guidance_kwargs.pop("negative_prompt", None)  # the negative branch comes with the embeds
                out = pipe(**text, latents=latents.to(adapter.device, adapter.dtype), **guidance_kwargs, **kwargs)
                images.extend(out.images)
                if chunk_dir is not None:
                    _write_chunk(chunk_dir, out.images)
    finally:
        handle.phase("train")
    return images


def _chunk_dir(cache: str | Path, prompts: list[str], seeds: list[int], settings: dict[str, Any],
               call_kwargs: dict[str, Any]) -> Path:
    import hashlib
    import json

    sampler = {k: settings[k] for k in ("steps", "guidance", "resolution", "scheduler")}
    extra = {k: repr(v) for k, v in sorted(call_kwargs.items()) if isinstance(v, (int, float, str, bool))}
    key = json.dumps({"prompts": prompts, "seeds": [int(s) for s in seeds], "sampler": sampler, "extra": extra},
                     sort_keys=True)
    return Path(cache) / hashlib.sha256(key.encode()).hexdigest()[:24]


def _write_chunk(folder: Path, images: list[Any]) -> None:
    """PNGs of one batch with a ``done`` marker, written as one folder committed at the end (a kill leaves no half)."""

    from .io import output_folder
    with output_folder(folder, overwrite=True, what="image cache") as tmp:
        for k, image in enumerate(images):
            image.save(tmp / f"{k:04d}.png")
        (tmp / "done").write_text(str(len(images)))


def _read_chunk(folder: Path, n: int) -> list[Any]:
    from PIL import Image

    out = []
    for k in range(n):
        with Image.open(folder / f"{k:04d}.png") as im:
            out.append(im.convert("RGB"))
    return out
