"""Which modules each LoRA reader loads, per model family and file format — as data, read from the readers' code.

Every :class:`Rule` says, for one reader, one family (``sd``, ``sdxl``, ``flux``, ``sd3``) and one file format
(``kohya``: ``lora_unet_<module>.lora_down.weight``…; ``diffusers``: ``<prefix>.<module>.lora_A.weight``…), which
module names (the part of a key before ``.lora_down`` / ``.lora_A``) it applies, and what it does with the others:
drops them silently, drops them with a console warning, or refuses the whole file. Each reader names the version and
the code the rule was read from; a reader/family/format without a rule has no loader for such files. The rules are
about the real architectures (SD-1.5, SDXL-base, FLUX.1, SD3): block indices are not checked against a config.

The exporter (:mod:`.targets`) uses these rules to place every module where the target's readers load it, and
``trace-erase info FILE`` uses them to say which reader loads a file whole and which would drop what.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

FAMILIES = ("sd", "sdxl", "flux", "sd3")
DROPS, WARNS, REFUSES = "drops", "warns", "refuses"

# ---- name fragments (module paths with '.' written '_', as in kohya keys) -----------------------------------
_ANY_UNET = r"lora_unet_\w+"
# children of a diffusers/kohya Transformer2DModel that are Linear or 1×1 Conv (what sd-scripts wraps)
_ATTN_LEAF = r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
_SD_ATTN = r"lora_unet_((down|up)_blocks_\d+_attentions_\d+|mid_block_attentions_0)_" + _ATTN_LEAF
_SD_RES = (r"lora_unet_((down|up)_blocks_\d+_resnets_\d+|mid_block_resnets_\d+)_"
           r"(conv1|conv2|time_emb_proj|conv_shortcut)")
_SD_SAMPLERS = (r"lora_unet_down_blocks_\d+_downsamplers_0_conv", r"lora_unet_up_blocks_\d+_upsamplers_0_conv")
_SGM_ATTN = r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_" + _ATTN_LEAF
_SGM_RES = (r"lora_unet_(input_blocks_\d+_0|middle_block_[02]|output_blocks_\d+_0)_"
            r"(in_layers_2|emb_layers_1|out_layers_3|skip_connection)")
_SGM_SAMPLERS = (r"lora_unet_input_blocks_\d+_0_op", r"lora_unet_output_blocks_\d+_[12]_conv")
_LDM_ANY = r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\w+"
_A1111_DIFFUSERS = (r"lora_unet_(conv_in|conv_out|time_embedding_linear_[12])",
                    r"lora_unet_(down|up)_blocks_\d+_(attentions|resnets)_\d+_\w+",
                    r"lora_unet_mid_block_(attentions|resnets)_\d+_\w+",
                    r"lora_unet_down_blocks_\d+_downsamplers_0_conv")
_BFL_BLOCKS = (r"lora_unet_double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)",
               r"lora_unet_single_blocks_\d+_(linear1|linear2|modulation_lin)")
_BFL_EMBED = r"lora_unet_(img_in|txt_in|(time_in|vector_in|guidance_in)_(in|out)_layer)"
_SAI_ALL = (r"lora_unet_joint_blocks_\d+_(context_block|x_block)_\w+",
            r"lora_unet_(context_embedder|x_embedder_proj|(t_embedder|y_embedder)_mlp_[02]|final_layer_\w+)")
# CLIP text-encoder Linear layers (q/k/v/out projections and both MLP layers of each transformer layer): kohya names
# (SD1 ``lora_te_``; SDXL ``lora_te1_``/``lora_te2_``) and PEFT names (``text_encoder[_2].text_model.…``)
_TE_LEAF = r"(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
_KOHYA_TE_SD = rf"lora_te_text_model_encoder_layers_\d+_{_TE_LEAF}"
_KOHYA_TE_SDXL = rf"lora_te[12]_text_model_encoder_layers_\d+_{_TE_LEAF}"
_PEFT_TE_LEAF = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
_PEFT_TE_SD = rf"text_encoder\.text_model\.encoder\.layers\.\d+\.{_PEFT_TE_LEAF}"
_PEFT_TE_SDXL = rf"text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.{_PEFT_TE_LEAF}"
_TE = {("sd", "kohya"): _KOHYA_TE_SD, ("sdxl", "kohya"): _KOHYA_TE_SDXL, ("sd", "diffusers"): _PEFT_TE_SD,
       ("sdxl", "diffusers"): _PEFT_TE_SDXL}
_PEFT_UNET_NO_TO = r"unet\.(?![\w.]*\.to_)[\w.]+"  # PEFT UNet keys without '.to_' in the module path
_PEFT_TRANSFORMER = r"transformer\.[\w.]+"
_PEFT_ANY = r"(unet|transformer)\.[\w.]+"
_INVOKE_FLUX_DIFFUSERS = (
    r"transformer\.(context_embedder|x_embedder|proj_out)",
    r"transformer\.time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]",
    r"transformer\.transformer_blocks\.\d+\.(norm1|norm1_context)\.linear",
    r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
    r"transformer\.transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
    r"transformer\.single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)",
)


@dataclass(frozen=True)
class Rule:
    """What one reader does with one family's files in one format. ``loads``: regexes a module name must match in
    full to be applied; ``unmatched``: what happens to the others (``drops`` silently, ``warns`` on the console and
    drops, ``refuses`` the file); ``requires``: module names the file must hold to be recognised at all;
    ``groups``: (block regex, member suffixes) — when a block holds one member it must hold all of them;
    ``refuses_over``: the file is refused when more than this many of its tensors are unmatched."""

    loads: tuple[str, ...]
    unmatched: str
    reads: str
    requires: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    refuses_over: int | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.loads))

    def loads_module(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._compiled)

    def missing(self, names: list[str]) -> list[str]:
        """Module names this rule needs the file to hold besides ``names``: its ``requires`` and the absent members
        of every group one of ``names`` belongs to."""
        have = set(names)
        out = [r for r in self.requires if r not in have]
        for block, members in self.groups:
            pattern = re.compile(f"({block})({'|'.join(re.escape(m) for m in members)})")
            for name in names:
                if m := pattern.fullmatch(name):
                    out += [m[1] + other for other in members if m[1] + other not in have and m[1] + other not in out]
        return out


@dataclass(frozen=True)
class Reader:
    """A LoRA loader: its short ``key`` (what ``--target`` tables refer to), display name, the version its rules
    describe, the code they were read from, and its :class:`Rule` per (family, format)."""

    key: str
    name: str
    version: str
    source: str
    rules: dict[tuple[str, str], Rule]


def _same(rule: Rule, *pairs: tuple[str, str]) -> dict[tuple[str, str], Rule]:
    return {p: rule for p in pairs}


_COMFY_KOHYA = Rule((_ANY_UNET,), WARNS, "lora_unet_ + the path of any weight of the model (SD/SDXL: LDM/sgm or "
                    "diffusers names; FLUX: BFL; SD3: SAI); unknown keys: 'lora key not loaded' on the console")
_COMFY_PEFT_UNET = Rule((_PEFT_UNET_NO_TO,), WARNS, "PEFT UNet keys only where the module path has no '.to_' (the "
                        "key map rewrites '.to_' into '.processor.to_', the old attention-processor form), so "
                        "attention projections are not loaded")
_COMFY_PEFT_DIT = Rule((_PEFT_TRANSFORMER,), WARNS, "transformer.<diffusers module>: every module, mapped onto the "
                       "fused BFL/SAI weights")
_SDS_SD = Rule((_SD_ATTN, _SD_RES, *_SD_SAMPLERS), DROPS, "networks/lora.py: Linear/Conv children of "
               "Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D (diffusers names); other keys are left "
               "unused (load_state_dict strict=False)")
_SDS_SDXL = Rule((_SGM_ATTN, _SGM_RES, *_SGM_SAMPLERS), DROPS, "networks/lora.py on sdxl_original_unet: the "
                 "same module classes under sgm names; no module for label_emb/time_embed, conv_in/out")
_SDS_FLUX = Rule((*_BFL_BLOCKS, _BFL_EMBED), DROPS, "networks/lora_flux.py: double/single block Linears, and from "
                 "a file the img_in/time_in/vector_in/guidance_in/txt_in Linears (in_dims, since 2024-09-14)")
_SDS_SD3 = Rule(_SAI_ALL, DROPS, "networks/lora_sd3.py: SingleDiTBlock Linears, and from a file the "
                "context/t/x/y embedders and final layer (emb_dims)")
_NOTHING = Rule((), DROPS, "reads no key of this format")

_READERS: dict[str, Reader] = {r.key: r for r in (
    Reader("comfyui", "ComfyUI", "0.3.64", "comfyanonymous/ComfyUI@41444b5 comfy/lora.py (load_lora, "
           "model_lora_keys_unet), comfy/utils.py (unet_to_diffusers, flux_to_diffusers)", {
               **_same(_COMFY_KOHYA, ("sd", "kohya"), ("sdxl", "kohya"), ("flux", "kohya"), ("sd3", "kohya")),
               **_same(_COMFY_PEFT_UNET, ("sd", "diffusers"), ("sdxl", "diffusers")),
               **_same(_COMFY_PEFT_DIT, ("flux", "diffusers"), ("sd3", "diffusers"))}),
    Reader("a1111", "AUTOMATIC1111 webui", "1.10", "AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/"
           "networks.py (load_network, convert_diffusers_name_to_compvis)", {
               ("sd", "kohya"): Rule((*_A1111_DIFFUSERS, r"lora_unet_up_blocks_\d+_upsamplers_0_conv", _LDM_ANY),
                                     DROPS, "diffusers UNet names converted to LDM ones by regex, or LDM names; "
                                     "unmatched keys only in a debug log"),
               ("sdxl", "kohya"): Rule((*_A1111_DIFFUSERS, r"lora_unet_up_blocks_[1-9]\d*_upsamplers_0_conv",
                                        _LDM_ANY), DROPS, "sgm names (lora_unet → diffusion_model), or diffusers "
                                       "names through the SD1 regex (up_blocks.0's upsampler lands on the wrong "
                                       "index); unmatched keys only in a debug log"),
               **_same(Rule((), DROPS, "splits keys at the first dot: PEFT 'unet.' keys match no module (debug "
                            "log only)"), ("sd", "diffusers"), ("sdxl", "diffusers"))}),
    Reader("forge", "Forge", "f2.0.1 (dfdcbab, 2025-06-26)", "lllyasviel/stable-diffusion-webui-forge@dfdcbab "
           "backend/patcher/lora.py → packages_3rdparty/comfyui_lora_collection/lora.py; extensions-builtin/"
           "sd_forge_lora/networks.py", {
               **_same(Rule((_ANY_UNET,), WARNS, "ComfyUI's key map (lora_unet_ + any model weight); unmatched "
                            "keys printed, the whole file refused past 12", refuses_over=12),
                       ("sd", "kohya"), ("sdxl", "kohya"), ("flux", "kohya")),
               **_same(Rule((_PEFT_UNET_NO_TO,), WARNS, "ComfyUI's PEFT UNet map: no module path with '.to_'",
                            refuses_over=12), ("sd", "diffusers"), ("sdxl", "diffusers")),
               ("flux", "diffusers"): Rule((_PEFT_TRANSFORMER,), WARNS, "transformer.<diffusers module> mapped onto "
                                           "BFL weights", refuses_over=12)}),
    Reader("invokeai", "InvokeAI", "6.14", "invoke-ai/InvokeAI@8e71a8a backend/model_manager/configs/lora.py "
           "(probe), backend/patches/lora_conversions/{formats,flux_kohya,flux_diffusers,sdxl}_lora_conversion_"
           "utils.py, backend/patches/layer_patcher.py", {
               ("sd", "kohya"): Rule((_ANY_UNET,), REFUSES, "diffusers names resolved module by module (an unknown "
                                     "one raises); the base is told from a cross-attention K/V key"),
               ("sdxl", "kohya"): Rule((_ANY_UNET,), REFUSES, "sgm names converted by the kohya SDXL map (label_emb "
                                       "→ add_embedding included), all or none; an unknown one raises"),
               ("flux", "kohya"): Rule(_BFL_BLOCKS, REFUSES, "detected as kohya FLUX only when every key is a "
                                       "double/single block key: txt_in/vector_in/img_in/time_in make it an "
                                       "'unsupported FLUX format'"),
               ("flux", "diffusers"): Rule(
                   _INVOKE_FLUX_DIFFUSERS, REFUSES, "detected as diffusers FLUX only with single block 0's to_q and "
                   "double block 0's add_q_proj present (else probed as a Qwen-Image LoRA); fused q/k/v need all "
                   "three; context_embedder → txt_in, text_embedder → vector_in; any other key fails an assert",
                   requires=("transformer.single_transformer_blocks.0.attn.to_q",
                             "transformer.transformer_blocks.0.attn.add_q_proj"),
                   groups=((r"transformer\.transformer_blocks\.\d+\.attn\.", ("to_q", "to_k", "to_v")),
                           (r"transformer\.transformer_blocks\.\d+\.attn\.", ("add_q_proj", "add_k_proj",
                                                                               "add_v_proj")))),
               **_same(Rule((), REFUSES, "PEFT 'unet.' keys: 'Unrecognized SDXL LoRA key prefix'"),
                       ("sd", "diffusers"), ("sdxl", "diffusers"))}),
    Reader("sd-scripts", "kohya sd-scripts (networks/lora*.py)", "48d368f (2026-02-16)",
           "kohya-ss/sd-scripts@48d368f networks/lora.py, networks/lora_flux.py, networks/lora_sd3.py "
           "(create_network_from_weights, create_modules)", {
               ("sd", "kohya"): _SDS_SD, ("sdxl", "kohya"): _SDS_SDXL, ("flux", "kohya"): _SDS_FLUX,
               ("sd3", "kohya"): _SDS_SD3,
               **_same(_NOTHING, ("sd", "diffusers"), ("sdxl", "diffusers"), ("flux", "diffusers"),
                       ("sd3", "diffusers"))}),
    Reader("sd-scripts-diffusers", "kohya sd-scripts lora_diffusers.merge_lora_weights", "48d368f (2026-02-16)",
           "kohya-ss/sd-scripts@48d368f networks/lora_diffusers.py (make_unet_conversion_map, LoRANetwork)", {
               ("sd", "kohya"): Rule(_SDS_SD.loads, REFUSES, "the module set of networks/lora.py on a diffusers "
                                     "UNet; a key without a module fails an assert (the whole file)"),
               ("sdxl", "kohya"): Rule((_SGM_ATTN, _SGM_RES, *_SGM_SAMPLERS, _SD_ATTN, _SD_RES,
                                        *_SD_SAMPLERS), REFUSES, "sgm names converted to diffusers ones (all or "
                                       "none), then the module set of networks/lora.py: label_emb becomes "
                                       "add_embedding_linear_1, which has no module, and the file is refused")}),
    Reader("diffusers", "diffusers", "0.42.1", "huggingface/diffusers v0.42.1 loaders/lora_pipeline.py, "
           "loaders/lora_conversion_utils.py (and run in tests/test_export.py)", {
               **_same(Rule((_ANY_UNET,), REFUSES, "kohya UNet keys converted (sgm blocks mapped to diffusers)"),
                       ("sd", "kohya"), ("sdxl", "kohya")),
               ("flux", "kohya"): Rule(_BFL_BLOCKS, DROPS, "double/single blocks converted (single_blocks linear1 "
                                       "split with FLUX.1's dimensions); txt_in/vector_in/img_in/time_in/guidance_in "
                                       "are converted without the 'transformer.' prefix and dropped without a "
                                       "warning"),
               ("sd3", "kohya"): Rule((), REFUSES, "no kohya converter for SD3"),
               **_same(Rule((_PEFT_ANY,), REFUSES, "PEFT keys with lora_adapter_metadata: every module"),
                       ("sd", "diffusers"), ("sdxl", "diffusers"), ("flux", "diffusers"), ("sd3", "diffusers"))}),
)}

# Which readers also apply the CLIP text encoders' LoRA modules (AdvUnlearn's), per (family, format), from their
# code: ComfyUI's model_lora_keys_clip (and Forge's copy of it, packages_3rdparty/comfyui_lora_collection) maps
# lora_te_/lora_te1_/lora_te2_ and text_encoder[_2].text_model.encoder.layers.N.… onto CLIP-L/G; A1111's
# convert_diffusers_name_to_compvis (a 1.x networks.py) maps lora_te_ (SD1) and, for SDXL, lora_te1_ →
# 0_transformer_text_model… and lora_te2_ → 1_model_transformer_resblocks… (q/k/v into the fused in_proj when q, k,
# v and out of a layer are all present); InvokeAI patches lora_te_/lora_te1_/lora_te2_ onto the text encoders
# (app/invocations/compel.py) and passes SDXL's through its key conversion; sd-scripts builds lora_te[12]_ modules for
# the Linear children of CLIPAttention/CLIPMLP (networks/lora.py, lora_diffusers.py); diffusers converts kohya
# lora_te* keys and loads PEFT text_encoder[_2]. keys (run in tests/test_advunlearn.py).
_KOHYA_PAIRS = (("sd", "kohya"), ("sdxl", "kohya"))
_ALL_PAIRS = (*_KOHYA_PAIRS, ("sd", "diffusers"), ("sdxl", "diffusers"))
TEXT_ENCODER_LOADS: dict[str, tuple[tuple[str, str], ...]] = {
    "comfyui": _ALL_PAIRS, "forge": _ALL_PAIRS, "diffusers": _ALL_PAIRS, "a1111": _KOHYA_PAIRS,
    "invokeai": _KOHYA_PAIRS, "sd-scripts": _KOHYA_PAIRS, "sd-scripts-diffusers": _KOHYA_PAIRS,
}


def _with_text_encoders(reader: Reader) -> Reader:
    """``reader`` with its text-encoder patterns added to the rules :data:`TEXT_ENCODER_LOADS` names."""
    rules = dict(reader.rules)
    for pair in TEXT_ENCODER_LOADS.get(reader.key, ()):
        rule = rules[pair]
        rules[pair] = dataclasses.replace(rule, loads=(*rule.loads, _TE[pair]),
                                          reads=rule.reads + "; text encoders: lora_te*/text_encoder[_2] CLIP layers")
    return dataclasses.replace(reader, rules=rules)


READERS: dict[str, Reader] = {key: _with_text_encoders(r) for key, r in _READERS.items()}


@dataclass
class Verdict:
    """What one reader does with one file: ``status`` is ``whole`` (every module applied), ``partial`` (``dropped``
    are not applied, silently or with a console warning), ``refused`` (nothing applied) or ``none`` (no loader)."""

    reader: Reader
    status: str
    dropped: list[str]
    reason: str

    def line(self, limit: int = 4) -> str:
        who = f"{self.reader.name} {self.reader.version}"
        if self.status == "whole":
            return f"{who}: loads the file whole"
        if self.status == "none":
            return f"{who}: has no loader for this family and format"
        names = ", ".join(self.dropped[:limit]) + (f" and {len(self.dropped) - limit} more"
                                                   if len(self.dropped) > limit else "")
        if self.status == "refused":
            return f"{who}: refuses the file ({self.reason}{': ' + names if names else ''})"
        return f"{who}: drops {len(self.dropped)} module(s) {self.reason}: {names}"


def judge(reader: Reader, family: str, fmt: str, names: list[str], tensors: int | None = None) -> Verdict:
    """What ``reader`` does with a ``fmt`` file of ``family`` holding the modules ``names`` (``tensors`` per module
    on average, for readers that refuse past a count; default 3 for kohya, 2 for diffusers)."""
    rule = reader.rules.get((family, fmt))
    if rule is None:
        return Verdict(reader, "none", list(names), "")
    missing = rule.missing(names)
    if missing:
        return Verdict(reader, "refused", missing, "it needs modules the file lacks")
    dropped = [n for n in names if not rule.loads_module(n)]
    if not dropped:
        return Verdict(reader, "whole", [], "")
    per = tensors or (3 if fmt == "kohya" else 2)
    if rule.unmatched == REFUSES or (rule.refuses_over is not None and len(dropped) * per > rule.refuses_over):
        return Verdict(reader, "refused", dropped, "unmatched modules")
    return Verdict(reader, "partial", dropped, "silently" if rule.unmatched == DROPS else "with a console warning")


def file_modules(keys: list[str]) -> tuple[str, list[str]]:
    """The format (``kohya`` or ``diffusers``) and module names of a LoRA file's tensor keys."""
    kohya = [k.split(".", 1)[0] for k in keys if k.startswith("lora_")]
    if kohya:
        return "kohya", list(dict.fromkeys(kohya))
    suffixes = (".lora_A.weight", ".lora_B.weight")
    return "diffusers", list(dict.fromkeys(k[: -len(s)] for k in keys for s in suffixes if k.endswith(s)))
