"""SD3 / SD3.5 (``SD3Transformer2DModel``): three text encoders, true classifier-free guidance, flow time.

Text enters the transformer at two places only: ``context_embedder`` reads the joint
sequence — the two CLIP encoders' penultimate states concatenated and zero-padded to the T5 width at the 77 CLIP
positions, then T5's states — and ``time_text_embed.text_embedder.linear_1`` reads the pooled CLIP-L ⊕ CLIP-G
vector. Stage A edits those two (a concept appears twice in the joint sequence, once per tokenizer: see
:meth:`SD3Adapter.token_layout`); stage B's LoRA goes on the text stream's ``add_k_proj``/``add_v_proj`` of every
joint block, the last (context-pre-only) one included. SD3.5's ``attn2`` is image self-attention, never a text path.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceEraseError
from .base import Conditioning, FamilyAdapter, PredictionType, SegmentedLayout, TextStream, layout_in

SD3_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    # text-stream keys/values of every joint block (our stage-B default)
    "kv": ("attn.add_k_proj", "attn.add_v_proj"),
    "kq": ("attn.add_k_proj", "attn.add_q_proj"),
    "cross-attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    # image-stream joint attention only (an ESD-u analogue); SD3.5's attn2 is image self-attention too
    "non-cross": ("attn.to_q", "attn.to_k", "attn.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
CONTEXT_EMBEDDER = "context_embedder"
POOLED_PROJECTION = "time_text_embed.text_embedder.linear_1"
T5_DEFAULT_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length


class SD3Adapter(FamilyAdapter):
    """SD3 / SD3.5: latents ``[B, C, H, W]`` as they are; model time is the flow σ on the 1000 scale the transformer
    takes (σ·1000, the scheduler's own timestep: passed through unchanged, as the pipeline does)."""

    family = "sd3"
    label = "SD3/SD3.5 (StableDiffusion3Pipeline)"
    pipeline_class = "StableDiffusion3Pipeline"
    sampler_defaults = {"steps": 28, "guidance": 7.0, "scheduler": "model"}  # StableDiffusion3Pipeline's own
    batch_pixels = 1024 * 1024
    export_base_version = "sd3"

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        return type(components.get("transformer")).__name__ == "SD3Transformer2DModel"
    denoiser_name = "transformer"
    time_kind = "flow"

    @classmethod
    def create(cls, pipe: Any, defaults: dict[str, Any]) -> SD3Adapter:
        return cls(pipe, resolution=defaults.get("resolution"))

    def __init__(self, pipe: Any, resolution: int | None = None):
        super().__init__(pipe)
        self.resolution = int(resolution or pipe.default_sample_size * pipe.vae_scale_factor)

    @property
    def prediction_type(self) -> PredictionType:
        return "flow"

    @property
    def time_scale(self) -> float:
        return 1000.0

    # ---- text ---------------------------------------------------------------------------------------------------
    @property
    def has_t5(self) -> bool:
        return self.pipe.text_encoder_3 is not None and self.pipe.tokenizer_3 is not None

    @property
    def t5_tokens(self) -> int:
        """T5 positions in the joint sequence (zeros without T5): the pipeline's default, capped by the tokenizer."""
        if self.pipe.tokenizer_3 is None:
            return T5_DEFAULT_LENGTH
        return int(min(T5_DEFAULT_LENGTH, self.pipe.tokenizer_3.model_max_length))

    @property
    def token_tokenizer(self) -> Any:
        return self.pipe.tokenizer  # CLIP-L; CLIP-G shares its vocabulary and positions

    @property
    def max_tokens(self) -> int:
        return int(self.pipe.tokenizer_max_length)  # the CLIP segment's length

    @property
    def sequence_length(self) -> int:
        return self.max_tokens + self.t5_tokens

    def token_layout(self, prompt: str, span: tuple[int, int]) -> SegmentedLayout:
        """The concept's positions in both segments of the joint sequence: CLIP (causal) at 0…76, T5 (reads both
        ways) from 77 on. Without T5 its segment is zeros and carries nothing to map."""
        parts = [(0, layout_in(self.token_tokenizer, self.max_tokens, prompt, span), False)]
        if self.has_t5:
            parts.append((self.max_tokens, layout_in(self.pipe.tokenizer_3, self.t5_tokens, prompt, span), True))
        return SegmentedLayout(parts)

    def count_tokens(self, text: str) -> int:
        counts = [super().count_tokens(text)]
        if self.has_t5:
            counts.append(len(self.pipe.tokenizer_3(text, add_special_tokens=False, verbose=False)["input_ids"]))
        return max(counts)

    def prompt_capacity(self) -> int:
        capacity = super().prompt_capacity()
        if self.has_t5:
            n_special = len(self.pipe.tokenizer_3("", add_special_tokens=True)["input_ids"])
            capacity = min(capacity, self.t5_tokens - n_special)
        return capacity

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.text_context():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.t5_tokens,
            )
        return {"tokens": embeds, "pooled": pooled}

    def text_streams(self, targets: str = "default") -> list[TextStream]:
        if targets in ("default", "context"):
            return [TextStream("tokens", [CONTEXT_EMBEDDER]),
                    TextStream("pooled", [POOLED_PROJECTION], per_token=False)]
        raise TraceEraseError(f"unknown stage-A targets '{targets}' for sd3; use 'context'")

    # ---- denoising ----------------------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str]) -> Conditioning:
        feats = self.encode_text(prompts)  # "" is the true unconditional branch: all three encoders read it
        return Conditioning({"encoder_hidden_states": feats["tokens"], "pooled_projections": feats["pooled"]})

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(
            hidden_states=x_t,
            timestep=t,  # the scheduler's timestep (σ·1000), as the pipeline passes it
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            pooled_projections=cond.tensors["pooled_projections"],
            return_dict=False,
        )[0]

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (batch, int(self.denoiser.config.in_channels), side, side)

    def model_input(self, scheduler: Any, x: torch.Tensor, scheduler_t: torch.Tensor) -> torch.Tensor:
        return x  # flow matching has no input scaling

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_tokens}

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    def lora_target_modules(self, preset: str = "kv") -> list[str]:
        if preset not in SD3_LORA_PRESETS:
            raise TraceEraseError(f"unknown LoRA target preset '{preset}'; choose one of {sorted(SD3_LORA_PRESETS)}")
        return self.linear_modules_ending(SD3_LORA_PRESETS[preset])
