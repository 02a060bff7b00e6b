"""How much a scene model uses the side words: its denoising loss on single-object renders captioned with the right
side, with the sides swapped, and with no caption, in three noise bands.

A model that binds "on the left"/"on the right" has a lower loss with the right side than with the sides swapped; one
that ignores them has the same loss (to the last digit). The noise bands are the training distribution, where a
picture's layout still shows through the noise (a schedule whose last step keeps some signal, or σ < 1), so a model
may read the side from the noisy latent instead of the caption. The ``start`` line is the sampler's first step, pure
noise, where only the caption can place the object: how far swapping the side word moves the clean-latent estimate
x̂0, relative to how far the caption moves it from the empty caption's — the *side effect*, 0 when the side word is
ignored.
``side share`` = (swapped − right) / (empty − right): the part of what the whole caption tells the denoiser that
the side word carries. Cheap (a few denoiser calls), so it
can be run on a training run's latest checkpoint (``OUTPUT.partial``) while it trains, long before a scene check.

    python benchmarks/scene_side_probe.py /work/scene-train/toy-flux-scenes.partial [--json out.json]
    python benchmarks/scene_side_probe.py out/toy-sd-scenes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from _script import refuse, run, write_json

SEED = 9_500_000  # render seeds of the probe: outside every training and check range of the toy world


def load_parts(folder: Path) -> tuple[Any, dict[str, Any], int | None]:
    """(recipe, components with trained weights, training step or None for a finished pipeline)."""
    from trace_erase.toyworld.config import ToyTrainConfig

    if (folder / "checkpoint.pt").is_file():
        from trace_erase.artifacts.checkpoint import load_checkpoint
        from trace_erase.toyworld.components import build_components

        raw = json.loads((folder / "config.json").read_text())["config"]
        fields = {f.name: f for f in dataclasses.fields(ToyTrainConfig)}
        cfg = ToyTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
        parts = build_components(cfg)
        state = load_checkpoint(folder / "checkpoint.pt")
        if state["phase"] != "denoiser":
            refuse(f"'{folder}' has not reached the denoiser phase yet; probe it later")
        for name, weights in state["models"].items():
            parts[name].load_state_dict(weights)
        parts["vae"].load_state_dict(state["vae"])
        return cfg, parts, int(state["step"])
    sidecar = folder / "trace_erase.json"
    if not sidecar.is_file():
        refuse(f"'{folder}' is neither a training run's .partial folder nor a toy pipeline; pass one of them")
    from diffusers import DiffusionPipeline

    raw = json.loads(sidecar.read_text())["training"]
    fields = {f.name for f in dataclasses.fields(ToyTrainConfig)}
    cfg = ToyTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    pipe = DiffusionPipeline.from_pretrained(folder)
    return cfg, dict(pipe.components), None


def unet_output(pipe: Any, cfg: Any, z: Any, t: Any, captions: list[str]) -> Any:
    """The toy SD UNet's output (ε or v, as its scheduler says) at latents ``z``, timesteps ``t``, under
    ``captions``."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=cfg.max_tokens, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.unet(z, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def with_share(losses: dict[str, float]) -> dict[str, float | None]:
    """The losses and the side share (swapped − right) / (empty − right); None when the caption does not help."""
    gap = losses["empty"] - losses["right"]
    return {**losses, "side_share": (losses["swapped"] - losses["right"]) / gap if gap > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a scene training run's OUTPUT.partial folder, or a trained scene pipeline")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        refuse(f"no folder '{folder}'; pass a scene training run's .partial folder or a scene pipeline")
    import numpy as np
    import torch

    from trace_erase.toyworld.components import assemble_pipeline
    from trace_erase.toyworld.data import to_tensor
    from trace_erase.toyworld.scenes.render import other_side, random_scene, render_scene
    from trace_erase.toyworld.train import ToyTrainer

    cfg, parts, step = load_parts(folder)
    if cfg.world != "scenes":
        refuse(f"'{folder}' is a single-object model; the side probe needs a scene model")
    images, right, swapped = [], [], []
    seed = SEED
    while len(images) < args.images:
        scene = random_scene(seed)
        seed += 1
        if len(scene.objects()) != 1:
            continue
        side = "left" if scene.left else "right"
        obj = scene.objects()[0]
        images.append(render_scene(scene, seed))
        right.append(f"a {obj.color} {obj.cls} on the {side}")
        swapped.append(f"a {obj.color} {obj.cls} on the {other_side(side)}")
    x = to_tensor(np.stack(images))
    bands: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        latents = parts["vae"].encode(x).latent_dist.mean
        pipe = assemble_pipeline(cfg, parts, (float(latents.mean()), float(latents.std())))
        gen = torch.Generator().manual_seed(1)
        for lo, hi in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0)):
            u = lo + (hi - lo) * torch.rand(len(x), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            losses = {}
            for name, captions in (("right", right), ("swapped", swapped), ("empty", [""] * len(x))):
                if cfg.family == "flux":
                    z0 = (latents - latents.mean()) / latents.std()
                    zt = (1 - u[:, None, None, None]) * z0 + u[:, None, None, None] * noise
                    err = ToyTrainer._flux_forward(pipe, zt, u, captions) - (noise - z0)
                else:
                    z0 = latents / latents.std()
                    t = (u * 999).long()
                    a = pipe.scheduler.alphas_cumprod[t][:, None, None, None]
                    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
                    v = pipe.scheduler.config.prediction_type == "v_prediction"
                    target = a.sqrt() * noise - (1 - a).sqrt() * z0 if v else noise
                    err = unet_output(pipe, cfg, zt, t, captions) - target
                losses[name] = float(err.pow(2).mean())
            bands[f"{lo:.1f}-{hi:.1f}"] = with_share(losses)
        # the sampler's first step: pure noise, where no layout leaks in from the picture and only the caption can
        # say where the object goes. What the caption changes in the clean-latent estimate x̂0 (against the empty
        # caption's x̂0 on the same noise) should land in the named slot: its share of that change's energy there
        noise = torch.randn(latents.shape, generator=gen)
        x0_hat = {}
        for name, captions in (("right", right), ("swapped", swapped), ("empty", [""] * len(x))):
            if cfg.family == "flux":
                x0_hat[name] = noise - ToyTrainer._flux_forward(pipe, noise, torch.ones(len(x)), captions)
            else:
                t = torch.full((len(x),), pipe.scheduler.config.num_train_timesteps - 1)
                a = pipe.scheduler.alphas_cumprod[t][:, None, None, None]
                out = unet_output(pipe, cfg, noise, t, captions)
                if pipe.scheduler.config.prediction_type == "v_prediction":
                    x0_hat[name] = a.sqrt() * noise - (1 - a).sqrt() * out
                else:
                    x0_hat[name] = (noise - (1 - a).sqrt() * out) / a.sqrt()
        # how much swapping the side word moves x̂0, relative to how much the caption moves it at all: 0 when the side
        # word is ignored; about 1 or more when the object moves to the other slot (an object there, the other slot
        # emptied, both changes counted)
        side_move = float((x0_hat["right"] - x0_hat["swapped"]).pow(2).mean())
        caption_move = float((x0_hat["right"] - x0_hat["empty"]).pow(2).mean())
        start = {"side_move": side_move, "caption_move": caption_move, "side_effect": side_move / caption_move}
    result = {"folder": str(folder), "step": step, "family": cfg.family, "images": args.images, "bands": bands,
              "start": start,
              "noise": "flow σ" if cfg.family == "flux" else "DDPM t / 1000"}
    for band, v in bands.items():
        share = "-" if v["side_share"] is None else f"{v['side_share']:+.3f}"
        print(f"{band}: right {v['right']:.5f}  swapped {v['swapped']:.5f}  empty {v['empty']:.5f}  side share {share}")
    print(f"start (pure noise): side effect {start['side_effect']:.3f} (swapping the side moves x̂0 by "
          f"{start['side_move']:.5f}, the caption by {start['caption_move']:.5f}; 0 = the side word is ignored)")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run(main)
