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
    # everything in the transformer blocks except cross-attention (ESD-u)
    "non-cross": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"),
}


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


def unet_lora_targets(unet: torch.nn.Module, preset: str) -> list[str]:
    """LoRA target module names for a UNet preset."""
    if preset not in UNET_LORA_PRESETS:
        raise TraceEraseError(f"unknown LoRA target preset '{preset}'; choose one of {sorted(UNET_LORA_PRESETS)}")
    return unet_modules_matching(unet, UNET_LORA_PRESETS[preset])
