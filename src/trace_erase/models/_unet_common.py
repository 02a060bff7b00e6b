"""Pieces shared by the UNet families (SD1.x/2.x and SDXL): the projections that read text and LoRA presets."""

from __future__ import annotations

import torch

from ..errors import TraceEraseError

UNET_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    # cross-attention keys/values: the text-carrying projections (TRACE/UCE/ESD-x default)
    "kv": ("attn2.to_k", "attn2.to_v"),
    # all of cross-attention
    "cross-attn": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    # self- and cross-attention
    "attn": (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    ),
    # image-side attention: all of self-attention and the cross-attention queries (TRCE's trained set; nothing that
    # reads the text features)
    "self-attn+q": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q"),
    # ESD-u's own selection (its "noxattn"): every linear and convolution layer except cross-attention, the time
    # embedding and the output layer — resnets, self-attention, feed-forward, projections, up/down samplers,
    # conv_in. Resolved by :func:`unet_non_cross_targets` (not by suffix).
    "non-cross": (),
}
# names ESD-u leaves alone (diffusers' names for CompVis's attn2 / time_embed / out.*)
NON_CROSS_EXCLUDED = ("attn2.", "time_embedding.", "add_embedding.", "add_time_proj", "conv_out")


def unet_modules_matching(unet: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the UNet's Linear layers whose name ends with one of ``suffixes``, in model order (a layer wrapped
    by peft for a loaded LoRA counts by its base layer)."""
    names = [
        name
        for name, mod in unet.named_modules()
        if isinstance(getattr(mod, "base_layer", mod), torch.nn.Linear) and any(name.endswith(s) for s in suffixes)
    ]
    if not names:
        raise TraceEraseError(
            f"no layers named *{suffixes[0]} in this UNet; is it a text-conditioned UNet2DConditionModel?"
        )
    return names


def unet_non_cross_targets(unet: torch.nn.Module) -> list[str]:
    """ESD-u's trainable set as LoRA targets: Linear and Conv2d layers outside cross-attention, the time embedding
    and the output convolution (a layer already wrapped by peft counts once, by its wrapper's name)."""
    out = []
    for name, mod in unet.named_modules():
        layer = getattr(mod, "base_layer", mod)
        if not name or name.endswith(".base_layer") or not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if any(part in f"{name}." for part in NON_CROSS_EXCLUDED):
            continue
        out.append(name)
    return out


def unet_lora_targets(unet: torch.nn.Module, preset: str) -> list[str]:
    """LoRA target module names for a UNet preset."""
    if preset not in UNET_LORA_PRESETS:
        raise TraceEraseError(f"unknown LoRA target preset '{preset}'; choose one of {sorted(UNET_LORA_PRESETS)}")
    if preset == "non-cross":
        return unet_non_cross_targets(unet)
    return unet_modules_matching(unet, UNET_LORA_PRESETS[preset])
