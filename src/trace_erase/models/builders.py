"""Pipelines with random weights built from the real diffusers/transformers classes' configs.

Used by the tests (tiny configs, like diffusers' own tests), by the benchmarks (SD-1.4-sized UNet, CLIP-L-sized
text encoder) and as the starting point of the toy world. Nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch

from .tokenizers import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer


def _ready(pipe: Any) -> Any:
    """Eval mode (as ``from_pretrained`` leaves models: no dropout) and no per-step progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_config(tokenizer: Any, hidden: int = 32, layers: int = 2, heads: int = 4, projection: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        vocab_size=len(tokenizer),
        projection_dim=projection,
        hidden_act="gelu",
    )


def _tiny_vae(latent_channels: int = 4, blocks: tuple[int, ...] = (8, 8), **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(blocks),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        **extra,
    )


def tiny_sd_pipeline(
    seed: int = 0, prediction_type: str = "epsilon", words: tuple[str, ...] = BASIC_WORDS, max_length: int = 77
) -> Any:
    """A tiny StableDiffusionPipeline (SD1.x layout; ``prediction_type='v_prediction'`` gives SD2.x-v)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, max_length)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    vae = _tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe)


def tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] = BASIC_WORDS, max_length: int = 77) -> Any:
    """A tiny StableDiffusionXLPipeline: two CLIP encoders (32-d each → 64-d tokens), pooled + time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, max_length)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(words, max_length),
        unet=unet,
        scheduler=scheduler,
    )
    return _ready(pipe)


def tiny_flux_pipeline(
    seed: int = 0, words: tuple[str, ...] = BASIC_WORDS, guidance_embeds: bool = True, max_length: int | None = None
) -> Any:
    """A tiny FluxPipeline: CLIP (pooled) + T5 (tokens) encoders, a 1+1-block transformer, flow-match Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, max_length or 77)
    tokenizer_2 = build_t5_tokenizer(words, max_length or 32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    t5_config = T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=len(tokenizer_2),
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    vae = _tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _ready(pipe)


def tiny_sd3_pipeline(seed: int = 0, variant: str = "sd3", words: tuple[str, ...] = BASIC_WORDS,
                      max_length: int = 77, t5_length: int = 32) -> Any:
    """A tiny StableDiffusion3Pipeline: two CLIP encoders (32-d each, padded into the 64-d joint space) + T5 (64-d).

    ``variant``: ``sd3`` (plain joint blocks), ``sd35`` (qk RMS-norm and image self-attention ``attn2`` in block 0,
    as SD3.5-medium) or ``no-t5`` (no third encoder: the T5 part of the joint sequence is zeros). The widths keep
    the pipeline's constraints: inner dim = heads × head dim, joint dim = T5 width ≥ both CLIP widths, pooled dim =
    both projections.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if variant not in ("sd3", "sd35", "no-t5"):
        raise ValueError(f"unknown tiny SD3 variant {variant!r}")
    torch.manual_seed(seed)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if variant == "sd35" else {}
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=16, **extra,
    )
    tokenizer = build_clip_tokenizer(words, max_length)
    tokenizer_2 = build_clip_tokenizer(words, max_length)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2))
    tokenizer_3 = text_encoder_3 = None
    if variant != "no-t5":
        tokenizer_3 = build_t5_tokenizer(words, t5_length)
        text_encoder_3 = T5EncoderModel(T5Config(
            d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4, vocab_size=len(tokenizer_3),
            pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0,
        ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    return _ready(pipe)


def _sd_vae(sample_size: int = 512, scaling_factor: float = 0.18215) -> Any:
    """The SD/SDXL VAE architecture (83M parameters, 8× downsampling), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, sample_size=sample_size, scaling_factor=scaling_factor,
    )


def sd14_architecture_pipeline(seed: int = 0, words: tuple[str, ...] = BASIC_WORDS, vae: str = "tiny") -> Any:
    """SD-1.4-sized UNet (860M) and CLIP-L-sized text encoder with random weights; ``vae="sd"`` adds the real VAE
    architecture (for generation timings), the default tiny one keeps closed-form benchmarks light."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
        layers_per_block=2,
    )
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=_sd_vae() if vae == "sd" else _tiny_vae(),
        text_encoder=CLIPTextModel(config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe)


def sdxl_architecture_pipeline(seed: int = 0, words: tuple[str, ...] = BASIC_WORDS) -> Any:
    """SDXL-base-sized pipeline with random weights: 2.6B UNet, CLIP-L + OpenCLIP-bigG encoders, the SDXL VAE.
    Needs ~14 GB in fp32; the real-scale benchmark builds it only on a GPU machine."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": 49408, "max_position_embeddings": 77}
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768, **ids)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280, **ids)
    pipe = StableDiffusionXLPipeline(
        vae=_sd_vae(1024, 0.13025),
        text_encoder=CLIPTextModel(clip_l),
        text_encoder_2=CLIPTextModelWithProjection(clip_g),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(words),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    return _ready(pipe)
