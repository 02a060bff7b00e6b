"""FLUX (rectified-flow MMDiT: T5 tokens via ``context_embedder``, pooled CLIP via the time-text embedder)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from ..errors import TraceEraseError
from .base import Conditioning, FamilyAdapter, PredictionType, TextStream

FLUX_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    # text-side keys/values of the double-stream blocks (our stage-B default)
    "kv": ("attn.add_k_proj", "attn.add_v_proj"),
    # EraseAnything's choice
    "kq": ("attn.add_k_proj", "attn.add_q_proj"),
    "cross-attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    # image-stream attention only (an ESD-u analogue)
    "non-cross": ("attn.to_q", "attn.to_k", "attn.to_v"),
}

# stage-A targets: "default" edits the time-independent text projections (UCE's FLUX choice)
CONTEXT_EMBEDDER = "context_embedder"
POOLED_PROJECTION = "time_text_embed.text_embedder.linear_1"


class _TokenAttentionProbe:
    """An attention processor for FLUX's double-stream blocks: the block's output is FluxAttnProcessor's, unchanged;
    besides it records, per image position, the attention mass (softmax over every key, mean over heads) the image
    queries put on the text positions where ``mask`` is 1 (``[B, L_text]``). The queries and keys are the ones the
    block itself computes (LoRA included, gradients kept), caught at the outputs of its q/k norms — nothing is
    projected twice. What EraseAnything's attention regulariser and contrastive term read (our reconstruction: its
    code returns maps from a forked diffusers)."""

    NORMS = ("norm_added_q", "norm_q", "norm_added_k", "norm_k")  # text then image, queries then keys

    def __init__(self, inner: Any, mask: torch.Tensor, sink: list[torch.Tensor]):
        self.inner, self.mask, self.sink = inner, mask, sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        seen: dict[str, torch.Tensor] = {}
        hooks = [getattr(attn, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out)) for name in self.NORMS]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            for hook in hooks:
                hook.remove()
        query = torch.cat([seen["norm_added_q"], seen["norm_q"]], dim=1)
        key = torch.cat([seen["norm_added_k"], seen["norm_k"]], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        n_text = encoder_hidden_states.shape[1]
        # recomputed in backward (checkpoint): only q and k stay alive, not a [B, heads, N_img, N] score matrix
        # per block (FLUX at 1024²: ~3.6 GB each in fp32)
        self.sink.append(torch.utils.checkpoint.checkpoint(
            _text_mass, query[:, n_text:], key, self.mask, n_text, attn.head_dim ** -0.5, use_reentrant=False))
        return out


def _text_mass(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, n_text: int,
               scale: float) -> torch.Tensor:
    """Mean over heads of the attention mass image queries put on the masked text keys (softmax over every key)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * scale
    probs = scores.softmax(dim=-1)[..., :n_text]
    return (probs * mask[:, None, None, :].to(probs)).sum(-1).mean(1)  # [B, N_img]


class FluxAdapter(FamilyAdapter):
    """FLUX.1 [dev]/[schnell]: latents are kept unpacked (``[B, C, H, W]``) outside; time is the flow σ ∈ [0, 1]."""

    family = "flux"
    label = "FLUX (FluxPipeline)"
    pipeline_class = "FluxPipeline"
    sampler_defaults = {"steps": 28, "guidance": 3.5, "scheduler": "model"}  # FLUX-dev's, its flow-match Euler
    batch_pixels = 1024 * 1024
    export_base_version = "flux1"

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        return type(components.get("transformer")).__name__ == "FluxTransformer2DModel"
    denoiser_name = "transformer"
    time_kind = "flow"
    fusion_targets = "add_kv"

    @classmethod
    def create(cls, pipe: Any, defaults: dict[str, Any]) -> FluxAdapter:
        return cls(pipe, resolution=defaults.get("resolution"), guidance_scale=defaults.get("guidance", 3.5),
                   height=defaults.get("height"), width=defaults.get("width"))

    def __init__(self, pipe: Any, resolution: int | None = None, guidance_scale: float = 3.5,
                 height: int | None = None, width: int | None = None):
        super().__init__(pipe)
        self.resolution = int(resolution or pipe.default_sample_size * pipe.vae_scale_factor)
        # a non-square picture (the toy scene models: 64 wide × 32 high); None: resolution × resolution
        self.size = None if height is None and width is None else (int(height or self.resolution),
                                                                   int(width or self.resolution))
        self.guidance_scale = guidance_scale

    @property
    def picture_hw(self) -> tuple[int, int]:
        """Pixel (height, width) the adapter samples at."""
        return self.size or (self.resolution, self.resolution)

    @property
    def prediction_type(self) -> PredictionType:
        return "flow"

    @property
    def token_tokenizer(self) -> Any:
        return self.pipe.tokenizer_2

    @property
    def max_tokens(self) -> int:
        # FluxPipeline pads T5 to max_sequence_length (≤ 512); positions must match what generation uses
        return int(min(512, self.pipe.tokenizer_2.model_max_length))

    def prompt_capacity(self) -> int:
        clip_capacity = int(self.pipe.tokenizer.model_max_length) - 2
        return min(super().prompt_capacity(), clip_capacity)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with self.text_context():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_tokens
            )
        return {"tokens": embeds, "pooled": pooled}

    HOOK_SIGMAS = (0.25, 0.5, 0.75)  # denoiser states at which add_k/add_v inputs are observed (ours)

    def text_streams(self, targets: str = "default") -> list[TextStream]:
        if targets in ("default", "context"):
            return [TextStream("tokens", [CONTEXT_EMBEDDER], bidirectional=True),  # T5 reads both ways
                    TextStream("pooled", [POOLED_PROJECTION], per_token=False)]
        if targets == "add_kv":  # the text-side K/V of each double-stream block; inputs depend on x_t and σ
            return [
                TextStream(f"block{i}", [f"transformer_blocks.{i}.attn.add_k_proj",
                                         f"transformer_blocks.{i}.attn.add_v_proj"], hooked=True,
                           bidirectional=True)
                for i in range(len(self.denoiser.transformer_blocks))
            ]
        raise TraceEraseError(f"unknown stage-A targets '{targets}' for flux; use 'context' or 'add_kv'")

    def stream_features(self, prompts: list[str], streams: list[TextStream]) -> dict[str, torch.Tensor]:
        if not any(s.hooked for s in streams):
            return self.encode_text(prompts)
        captured: dict[str, list[torch.Tensor]] = {s.name: [] for s in streams}
        handles = []
        for stream in streams:
            module = self.module(stream.modules[0])

            def grab(mod: torch.nn.Module, args: tuple, name: str = stream.name) -> None:
                captured[name].append(args[0].detach().float().cpu())

            handles.append(module.register_forward_pre_hook(grab))
        try:
            cond = self.conditioning(prompts)
            gen = torch.Generator().manual_seed(0)  # the same latents for every prompt: rows stay aligned
            noise = torch.randn(self.latent_shape(1), generator=gen).to(self.device, self.dtype)
            with torch.no_grad():
                for sigma in self.HOOK_SIGMAS:
                    x = noise.repeat(len(prompts), 1, 1, 1)
                    self.predict(x, torch.full((len(prompts),), sigma, device=self.device), cond)
        finally:
            for h in handles:
                h.remove()
        return {name: torch.stack(feats, dim=1) for name, feats in captured.items()}  # [B, K, L, d]

    def conditioning(self, prompts: list[str]) -> Conditioning:
        feats = self.encode_text(prompts)
        tensors = {"encoder_hidden_states": feats["tokens"], "pooled_projections": feats["pooled"]}
        if self.denoiser.config.guidance_embeds:
            tensors["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=self.device)
        return Conditioning(tensors)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = x_t.shape
        pipe = type(self.pipe)
        packed = pipe._pack_latents(x_t, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        ctx = cond.tensors["encoder_hidden_states"]
        txt_ids = torch.zeros(ctx.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = self.denoiser(
            hidden_states=packed,
            timestep=t.to(x_t.dtype),
            guidance=cond.tensors.get("guidance"),
            pooled_projections=cond.tensors["pooled_projections"],
            encoder_hidden_states=ctx,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)

    @contextlib.contextmanager
    def token_attention(self, mask: torch.Tensor) -> Iterator[list[torch.Tensor]]:
        """Within the context every double-stream block appends to the yielded list the attention mass its image
        queries put on the text positions where ``mask`` (``[B, L_text]``) is 1: one ``[B, N_img]`` map per block
        and forward. Outputs are unchanged; the original processors come back on exit."""
        sink: list[torch.Tensor] = []
        blocks = [block.attn for block in self.denoiser.transformer_blocks]
        originals = [attn.processor for attn in blocks]
        for attn, inner in zip(blocks, originals, strict=True):
            attn.set_processor(_TokenAttentionProbe(inner, mask.to(self.device), sink))
        try:
            yield sink
        finally:
            for attn, inner in zip(blocks, originals, strict=True):
                attn.set_processor(inner)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        # as FluxPipeline.prepare_latents: each side a multiple of 2 (the 2×2 patches it packs)
        scale = self.pipe.vae_scale_factor
        height, width = self.picture_hw
        return (batch, int(self.denoiser.config.in_channels) // 4, 2 * (height // (scale * 2)),
                2 * (width // (scale * 2)))

    def rollout_scheduler(self, num_steps: int) -> Any:
        """The flow-match Euler scheduler as FluxPipeline sets it (σ from 1 to 1/N, resolution-dependent shift)."""
        import copy

        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = copy.deepcopy(self.pipe.scheduler)
        _, _, height, width = self.latent_shape(1)
        seq_len = (height // 2) * (width // 2)  # packed image tokens, as the pipeline counts them for the shift
        cfg = scheduler.config
        mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return scheduler

    def model_time(self, scheduler_t: torch.Tensor) -> torch.Tensor:
        # FluxPipeline casts the timestep to the latents' dtype, then divides by 1000 (σ): the same rounding here
        return scheduler_t.to(self.dtype) / 1000.0

    def model_input(self, scheduler: Any, x: torch.Tensor, scheduler_t: torch.Tensor) -> torch.Tensor:
        return x  # FluxPipeline feeds the latents as they are (flow matching has no input scaling)

    @property
    def distilled_guidance(self) -> bool:
        """FLUX.1-dev/schnell take the guidance scale as an input (guidance-distilled); toy-flux does not."""
        return bool(self.denoiser.config.guidance_embeds)

    def guided_prediction(self, x_in: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                          guidance: float) -> torch.Tensor:
        """As FluxPipeline samples: a guidance-distilled model gets ``guidance`` as its guidance embedding and one
        conditional pass (no true CFG on top); a model without the embedding gets true CFG against ``uncond``."""
        if self.distilled_guidance:
            tensors = dict(cond.tensors)
            tensors["guidance"] = torch.full((x_in.shape[0],), float(guidance), device=self.device)
            return self.predict(x_in, t, Conditioning(tensors))
        return super().guided_prediction(x_in, t, cond, uncond, guidance)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_tokens}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return type(self.pipe)._pack_latents(latents, b, c, h, w)

    def pipeline_guidance(self, guidance: float, batch: int) -> dict[str, Any]:
        if self.distilled_guidance:
            return {"guidance_scale": guidance}
        # no distilled guidance input (like our toy-flux): true CFG against the empty prompt
        return {"true_cfg_scale": guidance, "guidance_scale": 1.0, "negative_prompt": [""] * batch}

    def lora_target_modules(self, preset: str = "kv") -> list[str]:
        if preset not in FLUX_LORA_PRESETS:
            raise TraceEraseError(f"unknown LoRA target preset '{preset}'; choose one of {sorted(FLUX_LORA_PRESETS)}")
        return self.linear_modules_ending(FLUX_LORA_PRESETS[preset])
