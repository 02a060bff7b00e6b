"""Stable Diffusion 1.x / 2.x (ε- or v-prediction UNet, one CLIP text encoder)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceEraseError
from ._unet_common import unet_lora_targets, unet_modules_matching
from .base import Conditioning, FamilyAdapter, PredictionType, TextStream, sample_hw


class StableDiffusionAdapter(FamilyAdapter):
    """SD1.x/2.x: token features are the text encoder's last hidden states, read by every ``attn2.to_k/to_v``."""

    family = "sd"
    denoiser_name = "unet"
    time_kind = "ddpm"
    label = "SD1.x/2.x (StableDiffusionPipeline)"
    pipeline_class = "StableDiffusionPipeline"
    sampler_defaults = {"steps": 50, "guidance": 7.5, "scheduler": "ddim"}
    batch_pixels = 8 * 512 * 512
    export_base_version = "sd_v1"
    stream_conditioning = {"tokens": "encoder_hidden_states"}

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        unet = components.get("unet")
        return (type(unet).__name__ == "UNet2DConditionModel" and components.get("text_encoder") is not None
                and getattr(unet.config, "addition_embed_type", None) is None)

    @property
    def prediction_type(self) -> PredictionType:
        kind = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise TraceEraseError(f"unsupported prediction_type '{kind}' in the scheduler config; use epsilon or v")
        return kind

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    @property
    def token_tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def max_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.text_context():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"tokens": embeds}

    def text_streams(self, targets: str = "default") -> list[TextStream]:
        if targets not in ("default", "kv"):
            raise TraceEraseError(f"unknown stage-A targets '{targets}' for {self.family}; use 'kv'")
        return [TextStream("tokens", unet_modules_matching(self.denoiser, ("attn2.to_k", "attn2.to_v")))]

    def conditioning(self, prompts: list[str]) -> Conditioning:
        return Conditioning({"encoder_hidden_states": self.encode_text(prompts)["tokens"]})

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        height, width = sample_hw(self.denoiser.config.sample_size)
        return (batch, int(self.denoiser.config.in_channels), height, width)

    def lora_target_modules(self, preset: str = "kv") -> list[str]:
        return unet_lora_targets(self.denoiser, preset)
