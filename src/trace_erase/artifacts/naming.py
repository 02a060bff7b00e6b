"""Module names under the kohya / A1111 / ComfyUI conventions, per model family.

A kohya LoRA key is ``lora_unet_<module path with '_' for '.'>.{lora_down.weight, lora_up.weight, alpha}``. What the
module path is depends on the family:

- SD1.x/2.x: the diffusers UNet path (kohya trains SD1 on diffusers' UNet).
- SDXL: the sgm/LDM path (``input_blocks.4.1…``), the names kohya's SDXL tools and A1111 use; when an erasure edits
  a layer outside the attention blocks and embeddings (ESD-u's resnets), the whole file keeps the diffusers path,
  which A1111, ComfyUI and diffusers also read (mixing the two makes diffusers drop the sgm keys).
- FLUX: the BFL path, where several diffusers projections are one fused module (``txt_attn_qkv`` = add_q ⊕ add_k ⊕
  add_v): a :class:`KohyaModule` then lists its members in row order, and the exporter writes the members that were
  not trained as zero blocks (sd-scripts' converter drops a fused module whose first member is missing).
- Text encoders (AdvUnlearn's LoRA): ``lora_te_`` + the canonical CLIP path (``text_model.encoder.layers.N…``);
  SDXL's two encoders ``lora_te1_`` and ``lora_te2_``, as sd-scripts, ComfyUI and A1111 name them.
- SD3/SD3.5: the SAI MMDiT path (``joint_blocks.N.context_block.attn.qkv``), fused the same way; ComfyUI reads it,
  diffusers has no loader for it (export SD3 for diffusers in the diffusers format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import TraceEraseError
from ..models.text_lora import split_qualified

KOHYA_KEY = re.compile(r"^lora_(unet|te[123]?)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class KohyaModule:
    """One module of a kohya file: its name and the denoiser modules (relative to the denoiser) whose output rows it
    stacks, in order. A plain module has one member."""

    name: str
    members: tuple[str, ...]


def _key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


# ---- SDXL: diffusers → sgm ---------------------------------------------------------------------------------------
_SDXL_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_SDXL_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_SDXL_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_SDXL_EMBED = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}


def sgm_name(module: str, layers_per_block: int) -> str | None:
    """The sgm/LDM path of a diffusers SDXL UNet module, or None when outside the table (resnets, samplers)."""
    if module in _SDXL_EMBED:
        return _SDXL_EMBED[module]
    if m := _SDXL_DOWN.match(module):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{b * (layers_per_block + 1) + 1 + j}.1.{rest}"
    if m := _SDXL_UP.match(module):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * (layers_per_block + 1) + j}.1.{rest}"
    if m := _SDXL_MID.match(module):
        return f"middle_block.1.{m[1]}"
    return None


# ---- FLUX: diffusers → BFL ---------------------------------------------------------------------------------------
_FLUX_DOUBLE = {
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn_qkv",
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn_qkv",
    ("attn.to_add_out",): "txt_attn_proj",
    ("attn.to_out.0",): "img_attn_proj",
    ("ff.net.0.proj",): "img_mlp_0",
    ("ff.net.2",): "img_mlp_2",
    ("ff_context.net.0.proj",): "txt_mlp_0",
    ("ff_context.net.2",): "txt_mlp_2",
    ("norm1.linear",): "img_mod_lin",
    ("norm1_context.linear",): "txt_mod_lin",
}
_FLUX_SINGLE = {
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1",
    ("proj_out",): "linear2",
    ("norm.linear",): "modulation_lin",
}
_FLUX_GLOBAL = {
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
}
_FLUX_BLOCKS = {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
                "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)}
_BLOCK = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")


def _fused_module(module: str, global_names: dict[str, str], blocks: dict[str, tuple[str, dict]],
                  convention: str) -> KohyaModule:
    """The kohya module carrying ``module`` in a fused-projection convention (FLUX's BFL, SD3's SAI)."""
    if module in global_names:
        return KohyaModule(_key(global_names[module]), (module,))
    m = _BLOCK.match(module)
    if m and m[1] in blocks:
        kind, i, rest = m[1], m[2], m[3]
        prefix, table = blocks[kind]
        for members, name in table.items():
            if rest in members:
                return KohyaModule(_key(f"{prefix}.{i}.{name}"), tuple(f"{kind}.{i}.{p}" for p in members))
    raise TraceEraseError(f"the module '{module}' has no name in the {convention} convention; "
                          "export with --format diffusers or --format full")


# ---- SD3 / SD3.5: diffusers → SAI (MMDiT) ---------------------------------------------------------------------------
_SD3_BLOCK = {
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
    ("attn.to_add_out",): "context_block.attn.proj",
    ("attn.to_out.0",): "x_block.attn.proj",
    ("attn2.to_out.0",): "x_block.attn2.proj",
    ("ff_context.net.0.proj",): "context_block.mlp.fc1",
    ("ff_context.net.2",): "context_block.mlp.fc2",
    ("ff.net.0.proj",): "x_block.mlp.fc1",
    ("ff.net.2",): "x_block.mlp.fc2",
    ("norm1_context.linear",): "context_block.adaLN_modulation.1",
    ("norm1.linear",): "x_block.adaLN_modulation.1",
}
_SD3_GLOBAL = {
    "context_embedder": "context_embedder",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
}
_SD3_BLOCKS = {"transformer_blocks": ("joint_blocks", _SD3_BLOCK)}


# ---- text encoders ---------------------------------------------------------------------------------------------------
# kohya's text-encoder prefixes: one CLIP encoder is ``lora_te``; SDXL's two are ``lora_te1`` and ``lora_te2``
_TE_PREFIXES = {"sd": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def kohya_text_module(family: str, qualified: str) -> KohyaModule:
    """The kohya module of a text-encoder module (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` →
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``; SDXL: ``lora_te1_``/``lora_te2_``)."""
    component, canonical = split_qualified(qualified)
    prefix = _TE_PREFIXES.get(family, {}).get(component or "")
    if prefix is None:
        raise TraceEraseError(f"no kohya name for the {family} {component} ('{qualified}'); export with --format "
                              "diffusers or --format full")
    return KohyaModule(f"{prefix}_{canonical.replace('.', '_')}", (qualified,))


# ---- all families ------------------------------------------------------------------------------------------------
def kohya_modules(family: str, modules: list[str], unet_config: Any = None) -> tuple[list[KohyaModule], str]:
    """The kohya modules that carry ``modules`` (diffusers names; text-encoder modules by their qualified names,
    which come first) and the naming used for the denoiser ("diffusers", "sgm", "bfl", "sai")."""
    text = [kohya_text_module(family, m) for m in modules if split_qualified(m)[0] is not None]
    found, naming = _denoiser_modules(family, [m for m in modules if split_qualified(m)[0] is None], unet_config)
    return text + found, naming


def _denoiser_modules(family: str, modules: list[str], unet_config: Any) -> tuple[list[KohyaModule], str]:
    if family == "sd":
        return [KohyaModule(_key(m), (m,)) for m in modules], "diffusers"
    if family == "sdxl":
        lpb = int(unet_config["layers_per_block"]) if unet_config is not None else 2
        names = {m: sgm_name(m, lpb) for m in modules}
        if all(v is not None for v in names.values()):
            return [KohyaModule(_key(names[m]), (m,)) for m in modules], "sgm"
        return [KohyaModule(_key(m), (m,)) for m in modules], "diffusers"
    if family in ("flux", "sd3"):
        fused: dict[str, KohyaModule] = {}
        for m in modules:
            km = _fused_module(m, _FLUX_GLOBAL, _FLUX_BLOCKS, "kohya/BFL") if family == "flux" else \
                _fused_module(m, _SD3_GLOBAL, _SD3_BLOCKS, "SAI")
            fused.setdefault(km.name, km)
        return list(fused.values()), "bfl" if family == "flux" else "sai"
    raise TraceEraseError(f"no kohya naming for the {family} family; export with --format diffusers")
