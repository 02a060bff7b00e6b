"""Stable Diffusion XL (two CLIP text encoders → 2048-d tokens, pooled embedding and size/crop time ids)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Conditioning, TextStream
from .sd import StableDiffusionAdapter


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL: the concatenated penultimate hidden states of both encoders feed every ``attn2.to_k/to_v``.

    The pooled embedding enters ``add_embedding.linear_1`` concatenated with the size/crop time-id features; stage A
    edits only the input columns that read the pooled text, so the time-id path is untouched. Both tokenizers use
    CLIP's BPE, so token positions agree.
    """

    POOLED_PROJECTION = "add_embedding.linear_1"
    # the pooled stream is the text columns of add_embedding.linear_1's input: text_embeds as the conditioning has it
    stream_conditioning = {"tokens": "encoder_hidden_states", "pooled": "text_embeds"}

    def text_streams(self, targets: str = "default") -> list[TextStream]:
        streams = super().text_streams(targets)
        pooled_dim = int(self.pipe.text_encoder_2.config.projection_dim)
        streams.append(TextStream("pooled", [self.POOLED_PROJECTION], per_token=False, columns=(0, pooled_dim)))
        return streams

    family = "sdxl"
    label = "SDXL (StableDiffusionXLPipeline)"
    pipeline_class = "StableDiffusionXLPipeline"
    sampler_defaults = {"steps": 50, "guidance": 7.5, "scheduler": "ddim"}
    batch_pixels = 8 * 512 * 512  # 2 × 1024²
    export_base_version = "sdxl_base_v1-0"

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        unet = components.get("unet")
        return (type(unet).__name__ == "UNet2DConditionModel" and components.get("text_encoder") is not None
                and components.get("text_encoder_2") is not None
                and getattr(unet.config, "addition_embed_type", None) == "text_time")

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.text_context():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"tokens": embeds, "pooled": pooled}

    def conditioning(self, prompts: list[str]) -> Conditioning:
        feats = self.encode_text(prompts)
        embeds, pooled = feats["tokens"], feats["pooled"]
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            # the SDXL pipeline's unconditional branch is all zeros, not the encoded empty prompt
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = int(self.denoiser.config.sample_size) * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=embeds.device)
        return Conditioning(
            {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        )

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.tensors["text_embeds"], "time_ids": cond.tensors["time_ids"]}
        return self.denoiser(
            x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
