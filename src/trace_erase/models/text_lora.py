"""A LoRA on a pipeline's CLIP text encoders: which layers it covers, and how its modules are named.

A text-encoder module is named *qualified*: the pipeline component, then the canonical CLIP path, e.g.
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. That is the diffusers LoRA key without its
``.lora_A.weight`` tail, and what kohya's ``lora_te_…`` names spell with ``_``. transformers 5 flattens
``CLIPTextModel`` (its modules lose the ``text_model.`` root) but not ``CLIPTextModelWithProjection``, so files and
manifests keep the canonical path and :func:`live_name` finds the module on whichever class is loaded. Denoiser
modules are named relative to the denoiser, and never start with a text-encoder component's name.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceEraseError
from ..runtime import TEXT_ENCODERS

ROOT = "text_model."
# AdvUnlearn's ``text_encoder_full`` (component ``all``) trains every weight of the encoder's transformer layers and
# its final layer norm; a LoRA reaches the Linear layers among them: attention q/k/v/out and both MLP layers
TEXT_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "text_encoder_full": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "mlp.fc1", "mlp.fc2"),
}


def split_qualified(name: str) -> tuple[str | None, str]:
    """(component, canonical path) of a qualified text-encoder module name; (None, name) for a denoiser module."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in TEXT_ENCODERS and rest else (None, name)


def lora_key(name: str, denoiser_prefix: str) -> str:
    """A module's key stem in a diffusers-format LoRA file: ``{denoiser_prefix}.{name}`` for a denoiser module, the
    qualified name itself for a text-encoder one."""
    return name if split_qualified(name)[0] is not None else f"{denoiser_prefix}.{name}"


def live_name(encoder: torch.nn.Module, canonical: str) -> str:
    """The module path of ``canonical`` on ``encoder`` as loaded (without ``text_model.`` on a flattened one)."""
    return canonical if hasattr(encoder, "text_model") else canonical.removeprefix(ROOT)


def canonical_name(encoder: torch.nn.Module, live: str) -> str:
    """The canonical CLIP path (``text_model.…``) of a module path of ``encoder``."""
    return live if hasattr(encoder, "text_model") else ROOT + live


def clip_encoders(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's CLIP text encoders by component name, in order (T5 and other encoders left out)."""
    out = {}
    for name in TEXT_ENCODERS:
        enc = getattr(pipe, name, None)
        if enc is not None and type(enc).__name__.startswith("CLIPText"):
            out[name] = enc
    return out


def text_lora_targets(pipe: Any, preset: str) -> dict[str, list[str]]:
    """Per CLIP text encoder of ``pipe``, the canonical paths of the Linear layers a LoRA of ``preset`` targets."""
    if preset not in TEXT_LORA_PRESETS:
        raise TraceEraseError(f"unknown text-encoder LoRA preset '{preset}'; choose one of "
                              f"{', '.join(TEXT_LORA_PRESETS)}")
    encoders = clip_encoders(pipe)
    if not encoders:
        raise TraceEraseError("this pipeline has no CLIP text encoder for a text-encoder LoRA; pick another --method")
    suffixes = tuple("." + s for s in TEXT_LORA_PRESETS[preset])
    out = {}
    for component, enc in encoders.items():
        names = [canonical_name(enc, n) for n, m in enc.named_modules()
                 if n.endswith(suffixes) and ".layers." in n and isinstance(getattr(m, "base_layer", m),
                                                                            torch.nn.Linear)]
        out[component] = [n for n in names if not n.endswith(".base_layer")]
    return out


def text_module(pipe: Any, qualified: str) -> torch.nn.Module:
    """The module a qualified text-encoder name points at; for a peft-wrapped layer, its original base layer."""
    component, canonical = split_qualified(qualified)
    encoder = getattr(pipe, component or "", None)
    if encoder is None:
        raise AttributeError(f"this pipeline has no {component}")
    mod = encoder.get_submodule(live_name(encoder, canonical))
    return getattr(mod, "base_layer", mod)
