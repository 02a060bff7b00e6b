"""The toy pipelines' components, built from the real diffusers/transformers classes, and their assembly into a
``StableDiffusionPipeline`` (toy-sd) or ``FluxPipeline`` (toy-flux)."""

from __future__ import annotations

from typing import Any

import torch

from ..engines.prompts import DEFAULT_TEMPLATES
from ..errors import TraceEraseError
from ..models.tokenizers import (
    BASIC_WORDS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    extend_clip_tokenizer,
    extend_t5_tokenizer,
)
from .config import ToyTrainConfig
from .render import vocabulary


def trained_components(family: str) -> list[str]:
    """Pipeline components the denoiser phase trains (jointly with the text encoders)."""
    return ["text_encoder", "transformer", "text_encoder_2"] if family == "flux" else ["text_encoder", "unet"]


def toy_words(world: str = "objects") -> list[str]:
    """Vocabulary of the toy tokenizers: the toy captions (the scene captions' too for ``world='scenes'``), the
    erasure templates and common words."""
    template_words = " ".join(t.replace("{}", " ") for t in DEFAULT_TEMPLATES).split()
    return sorted({*vocabulary(), *template_words, *BASIC_WORDS, *(scene_words() if world == "scenes" else ())})


def scene_words() -> list[str]:
    """Every word of the scene captions (imported here: the scene package is only needed for that world)."""
    from .scenes.captions import vocabulary as scene_vocabulary

    return scene_vocabulary()


def latent_size(cfg: ToyTrainConfig) -> int | tuple[int, int]:
    """The UNet's ``sample_size``: the latent side, or (height, width) for non-square pictures."""
    scale = 2 ** (len(cfg.vae_channels) - 1)
    h, w = cfg.height_width
    return h // scale if h == w else (h // scale, w // scale)


def build_components(cfg: ToyTrainConfig) -> dict[str, Any]:
    """Fresh (random) components of the toy pipeline, from the real diffusers/transformers classes; with
    ``cfg.init_from``, the text encoder(s) and (``init_parts="all"``) the denoiser of that trained pipeline instead
    (:func:`initial_components`)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    words = toy_words(cfg.world)
    tokenizer = build_clip_tokenizer(words, cfg.max_tokens)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=list(cfg.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=1, norm_num_groups=8, sample_size=cfg.image_size,
    )
    if cfg.init_from is not None and cfg.init_parts == "all":
        return {"vae": vae, **initial_components(cfg)}
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_tokens,
        projection_dim=cfg.text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    latent = latent_size(cfg)
    parts: dict[str, Any] = {"vae": vae, "tokenizer": tokenizer, "text_encoder": CLIPTextModel(clip_cfg)}
    if cfg.family == "sd":
        from diffusers import UNet2DConditionModel

        k = len(cfg.widths)
        parts["unet"] = UNet2DConditionModel(
            sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.widths, layers_per_block=1,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (k - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (k - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_width, attention_head_dim=4, norm_num_groups=8,
        )
    else:
        from diffusers import FluxTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        tokenizer_2 = build_t5_tokenizer(words, cfg.max_tokens)
        t5 = T5Config(
            vocab_size=len(tokenizer_2), d_model=cfg.text_width, d_kv=cfg.text_width // 4, d_ff=4 * cfg.text_width,
            num_layers=cfg.text_layers, num_heads=4, pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, dropout_rate=0.0,
        )
        head = cfg.flux_head_dim
        rope = [head // 4, 3 * head // 8, 3 * head // 8]
        parts.update(
            tokenizer_2=tokenizer_2,
            text_encoder_2=T5EncoderModel(t5),
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=4 * cfg.latent_channels,  # FluxPipeline packs 2×2 latent patches
                num_layers=cfg.flux_layers[0], num_single_layers=cfg.flux_layers[1],
                attention_head_dim=head, num_attention_heads=cfg.flux_heads, joint_attention_dim=cfg.text_width,
                pooled_projection_dim=cfg.text_width, guidance_embeds=False, axes_dims_rope=rope,
            ),
        )
    if cfg.init_from is not None:  # init_parts="text": the trained text side, a fresh denoiser of this recipe
        parts.update(initial_components(cfg))
    return parts


ARCHITECTURE = ("family", "max_tokens", "text_width", "text_layers", "vae_channels", "latent_channels", "widths",
                "flux_layers", "flux_heads", "flux_head_dim")  # what a fine-tune start must share with the recipe
TEXT_ARCHITECTURE = ("family", "max_tokens", "text_width", "text_layers", "vae_channels", "latent_channels")


def initial_components(cfg: ToyTrainConfig) -> dict[str, Any]:
    """The text encoder(s) and denoiser of the trained toy pipeline ``cfg.init_from``, to fine-tune: its tokenizer(s)
    extended by this world's new words (every old token keeps its id and embedding; new words get new rows, see
    :func:`init_new_rows`); a UNet's ``sample_size`` set to this recipe's latent size (FLUX's
    transformer has none: its rotary positions come from the image ids of each call)."""
    import dataclasses
    import json
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.loading import SIDECAR, resolve_model

    folder = Path(resolve_model(str(cfg.init_from)))
    sidecar = folder / SIDECAR
    if not sidecar.is_file():
        raise TraceEraseError(f"'{folder}' has no {SIDECAR}; init_from takes a pipeline made by "
                              "`trace-erase toyworld train`")
    done = {**json.loads(json.dumps(dataclasses.asdict(ToyTrainConfig()))),
            **json.loads(sidecar.read_text())["training"]}
    ours = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = [k for k in (ARCHITECTURE if cfg.init_parts == "all" else TEXT_ARCHITECTURE) if ours[k] != done[k]]
    if diff:
        raise TraceEraseError(f"init_from '{folder}' has other sizes ({', '.join(f'{k} {done[k]}' for k in diff)}); "
                              "start from a pipeline of this recipe's sizes")
    words = toy_words(cfg.world)
    tokenizer = extend_clip_tokenizer(CLIPTokenizer.from_pretrained(folder / "tokenizer"), words)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    init_new_rows(text_encoder, len(tokenizer), cfg.seed)  # appends rows; the old ones are kept as they are
    if cfg.family == "flux":
        from diffusers import FluxTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer

        tokenizer_2 = extend_t5_tokenizer(T5Tokenizer.from_pretrained(folder / "tokenizer_2"), words)
        text_encoder_2 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
        init_new_rows(text_encoder_2, len(tokenizer_2), cfg.seed + 1)  # the same for T5 (its tied input rows)
        text = {"tokenizer": tokenizer, "text_encoder": text_encoder, "tokenizer_2": tokenizer_2,
                "text_encoder_2": text_encoder_2}
        if cfg.init_parts == "text":
            return text
        return {**text, "transformer": FluxTransformer2DModel.from_pretrained(folder / "transformer")}
    if cfg.init_parts == "text":
        return {"tokenizer": tokenizer, "text_encoder": text_encoder}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    size = latent_size(cfg)
    unet.register_to_config(sample_size=list(size) if isinstance(size, tuple) else size)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet}


def init_new_rows(encoder: Any, size: int, seed: int) -> None:
    """Grow ``encoder``'s token embeddings to ``size`` rows; each new row is a random direction (seeded) with the old
    rows' median norm. The library's own resizing draws new rows from the old rows' mean and covariance, which in a
    toy vocabulary (most rows never trained) gives rows at 7–30 % of a trained word's norm: 'left' and 'right'
    then reach the denoiser almost identical, and a first scene fine-tune ignored them (its loss with the sides
    swapped equalled the loss with the right sides to 1e-6)."""
    old = encoder.get_input_embeddings().weight.detach().clone()
    encoder.resize_token_embeddings(size, mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    n_new = size - len(old)
    if n_new <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_new, old.shape[1], generator=gen, dtype=old.dtype)
    rows = rows / rows.norm(dim=1, keepdim=True) * old.norm(dim=1).median()
    with torch.no_grad():
        weight[len(old):] = rows


def assemble_pipeline(cfg: ToyTrainConfig, parts: dict[str, Any], latent_stats: tuple[float, float]) -> Any:
    """A StableDiffusionPipeline / FluxPipeline from trained components."""
    mean, std = latent_stats
    vae = parts["vae"]
    if cfg.family == "sd":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        vae.register_to_config(scaling_factor=1.0 / std)
        if cfg.noise_schedule == "v-zero-snr":
            scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, rescale_betas_zero_snr=True,
                                      prediction_type="v_prediction", timestep_spacing="trailing")
        else:
            scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                       unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                            text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                            text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
                            transformer=parts["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
