"""The questions every model family answers, so engines never branch on the architecture.

An adapter wraps a loaded diffusers pipeline (it never copies or modifies it) and answers: how to encode prompts into
the features that feed the text-carrying projections, how to predict at (x_t, t, conditioning), how time runs,
what the prediction is (ε, v or flow velocity), which projections stage A edits and which modules a LoRA targets.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import TraceEraseError
from .text_lora import split_qualified, text_module

PredictionType = Literal["epsilon", "v_prediction", "flow"]
TimeKind = Literal["ddpm", "flow"]


@dataclass
class TextStream:
    """A group of projections that all read the same text features.

    ``per_token`` streams have one feature row per token position (``[B, L, d]``); pooled streams have one row per
    prompt (``[B, d]``). Because every module in a stream reads the same input, the closed-form engine solves the
    normal equations once per stream and applies the result to all its modules.
    """

    name: str
    modules: list[str]
    per_token: bool = True
    # input columns the stream occupies when a module reads more than text (SDXL's add_embedding: pooled ⊕ time ids)
    columns: tuple[int, int] | None = None
    # features are the module's own inputs captured inside the denoiser (FLUX add_k/add_v), not encoder outputs
    hooked: bool = False
    # the features come from an encoder that reads in both directions (T5): every position, the ones before the
    # concept included, carries it. Causal encoders (CLIP) leave the positions before the concept untouched.
    bidirectional: bool = False


@dataclass
class Conditioning:
    """Everything the denoiser needs besides (x_t, t): batch-first tensors, keyed by the adapter's own names."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | slice | list[int]) -> Conditioning:
        """Rows ``index`` of every tensor (for mini-batches)."""
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated ``n`` times in a block (``[a, a, b, b]`` for n=2), for a batch of latents per prompt."""
        return Conditioning({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension."""
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items], dim=0) for k in keys})


@dataclass
class TokenLayout:
    """Where a prompt's tokens sit in the per-token features: the concept span and the sequence length."""

    start: int  # first position of the concept's tokens
    end: int  # one past the last concept token
    length: int  # number of positions up to and including the end-of-sequence token
    max_length: int  # positions in the feature tensor (padding included)


@dataclass
class SegmentedLayout:
    """A prompt's layouts in a feature sequence that concatenates several encoders' outputs (SD3's joint sequence:
    CLIP positions, then T5 positions): per segment its first position, its layout, and whether its encoder reads
    in both directions. Each segment is aligned on its own; positions are offset into the joint sequence."""

    parts: list[tuple[int, TokenLayout, bool]]


def sample_hw(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a denoiser's ``sample_size``: one int for square models, two for others (diffusers takes
    both; the toy scene models are 64 wide × 32 high)."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


def layout_in(tok: Any, max_tokens: int, prompt: str, span: tuple[int, int]) -> TokenLayout:
    """Token positions of the character span ``span`` of ``prompt`` as tokenizer ``tok`` places them."""
    enc = tok(prompt, return_offsets_mapping=True, truncation=True, max_length=max_tokens)
    offsets = enc["offset_mapping"]
    ids = enc["input_ids"]
    special = set(tok.all_special_ids)
    content = [i for i, (a, b) in enumerate(offsets) if ids[i] not in special and b > a]
    if span[1] <= span[0]:  # empty concept text (an empty anchor): where it would have been
        after = [i for i in content if offsets[i][0] >= span[0]]
        pos = after[0] if after else (content[-1] + 1 if content else len(ids) - 1)
        return TokenLayout(start=pos, end=pos, length=len(ids), max_length=max_tokens)
    inside = [i for i in content if offsets[i][0] < span[1] and offsets[i][1] > span[0]]
    if not inside:
        raise TraceEraseError(
            f"the concept at characters {span} of prompt '{prompt}' has no tokens (truncated?); "
            "use a shorter prompt or concept"
        )
    return TokenLayout(start=inside[0], end=inside[-1] + 1, length=len(ids), max_length=max_tokens)


class FamilyAdapter(ABC):
    """Base class of the model-family adapters (SD1.x/2.x, SDXL, FLUX, SD3). Each adapter owns every fact about its
    family: the class attributes below, how a pipeline is recognised (:meth:`matches`), and the model's maths.
    A new family is one adapter file plus its line in :mod:`.registry`."""

    family: str = ""  # the name in manifests, options and tables
    label: str = ""  # for messages: what a user calls it and the pipeline class it loads as
    pipeline_class: str = ""  # diffusers' pipeline class (``model_index.json``'s ``_class_name``)
    denoiser_name: str = ""  # "unet" or "transformer": the pipeline attribute and the LoRA key prefix
    time_kind: TimeKind = "ddpm"
    # the evaluation sampler of the paper line (steps, guidance, scheduler name; "model": the pipeline's own)
    sampler_defaults: dict[str, Any] = {}
    # pixels one generation batch may hold: what fits a 24 GB card in half precision with classifier-free guidance
    # (ours, from diffusers' documented footprints)
    batch_pixels: int = 8 * 512 * 512
    export_base_version: str = ""  # kohya's ``ss_base_model_version`` for files exported for this family
    _text_grad: bool = False  # encode_text keeps the autograd graph (attacks optimise text inputs through it)
    # stage-A stream → the conditioning tensor its projections read as they are (no layer between): where a map on
    # the text features can stand in for one on the conditioning (stage B's preimage branch). Empty: not declared.
    stream_conditioning: dict[str, str] = {}
    # stage-A targets whose streams are the inputs of stage B's text-side LoRA modules where the default targets'
    # are not (FLUX: the double-stream blocks' add_k/add_v, observed at a few noise levels): the token Grams a
    # fusion of per-concept LoRAs can use there. None: the default targets' streams are the ones, or none exist.
    fusion_targets: str | None = None

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        """Whether a loaded pipeline's components are this family's."""
        return False

    @classmethod
    def create(cls, pipe: Any, defaults: dict[str, Any]) -> FamilyAdapter:
        """The adapter of a loaded pipeline, with the sampler defaults recorded beside it (the toy sidecars)."""
        return cls(pipe)

    @classmethod
    def accepts_scheduler(cls, name: str) -> bool:
        """Whether generation may swap in the scheduler ``name`` ("model": the pipeline's own). DDPM-time families
        sample with any of diffusers' DDPM schedulers; flow families only with their own flow-matching one."""
        return cls.time_kind == "ddpm" or name == "model"

    def __init__(self, pipe: Any):
        self.pipe = pipe
        # where the denoiser computes when it is not resident (model CPU offload); None: wherever it is
        self.execution_device: torch.device | None = None

    # ---- identity ---------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.execution_device if self.execution_device is not None else self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    @abstractmethod
    def prediction_type(self) -> PredictionType:
        """What the denoiser predicts: ε, v, or the rectified-flow velocity."""

    def describe(self) -> dict[str, Any]:
        """A small summary recorded in manifests."""
        return {
            "family": self.family,
            "pipeline_class": type(self.pipe).__name__,
            "denoiser_class": type(self.denoiser).__name__,
            "prediction_type": self.prediction_type,
            "time_kind": self.time_kind,
        }

    # ---- text ---------------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def token_tokenizer(self) -> Any:
        """The tokenizer whose positions index the per-token text features."""

    @property
    @abstractmethod
    def max_tokens(self) -> int:
        """Positions in the per-token features (the padded sequence length)."""

    @property
    def sequence_length(self) -> int:
        """Positions of the per-token features (SD3's joint sequence holds several tokenizers' positions)."""
        return self.max_tokens

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text features per stream name: ``[B, L, d]`` for per-token streams, ``[B, d]`` for pooled ones."""

    def text_context(self) -> contextlib.AbstractContextManager:
        """What ``encode_text`` runs under: no autograd graph, unless inside :meth:`text_gradients`."""
        return torch.enable_grad() if self._text_grad else torch.no_grad()

    @contextlib.contextmanager
    def text_gradients(self) -> Iterator[None]:
        """Encode with gradients (to the text encoders' inputs): attacks optimise word embeddings through them."""
        self._text_grad = True
        try:
            yield
        finally:
            self._text_grad = False

    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs of the pipeline, in the pipeline's order (absent ones skipped)."""
        pairs = []
        for suffix in ("", "_2", "_3"):
            tok, enc = getattr(self.pipe, f"tokenizer{suffix}", None), getattr(self.pipe, f"text_encoder{suffix}", None)
            if tok is not None and enc is not None:
                pairs.append((tok, enc))
        return pairs

    @abstractmethod
    def text_streams(self, targets: str = "default") -> list[TextStream]:
        """The text-carrying projections stage A edits, grouped by the features they read."""

    def stream_features(self, prompts: list[str], streams: list[TextStream]) -> dict[str, torch.Tensor]:
        """Features per stream for ``prompts``: ``[B, L, d]`` / ``[B, d]``, or ``[B, K, L, d]`` when a stream is
        observed at K denoiser states (hooked streams). Default: the text encoders' outputs."""
        return self.encode_text(prompts)

    def token_layout(self, prompt: str, span: tuple[int, int]) -> TokenLayout | SegmentedLayout:
        """Token positions of the character span ``span`` of ``prompt`` in the per-token features."""
        return layout_in(self.token_tokenizer, self.max_tokens, prompt, span)

    def token_attention(self, mask: torch.Tensor) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """Context recording how much image positions attend to the text positions in ``mask`` (joint-attention
        families only; EraseAnything's attention terms read it)."""
        raise TraceEraseError(f"attention maps over text tokens are not available for {self.family}; "
                              "the attention terms (attention_weight, contrast_weight) are FLUX-only")

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes without special tokens."""
        # verbose=False: counting an over-long text is the point here, not an indexing error to warn about
        return len(self.token_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt_capacity(self) -> int:
        """How many content tokens fit in one prompt (the limit minus the special tokens)."""
        n_special = len(self.token_tokenizer("", add_special_tokens=True)["input_ids"])
        return self.max_tokens - n_special

    # ---- denoising ----------------------------------------------------------------------------------------------
    @abstractmethod
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """Encode prompts into the denoiser's conditioning (the empty prompt gives the unconditional branch)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output at latents ``x_t`` (``[B, C, H, W]``) and model time ``t`` (``[B]``)."""

    @abstractmethod
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """Latent shape for the model's default resolution."""

    # ---- time ------------------------------------------------------------------------------------------------------
    @property
    def time_scale(self) -> float:
        """The model's time range: DDPM timesteps run over [0, num_train_timesteps), flow σ over [0, 1]."""
        return 1.0 if self.time_kind == "flow" else float(self.pipe.scheduler.config.num_train_timesteps)

    def is_late(self, t: torch.Tensor, tau: float) -> torch.Tensor:
        """LATE = low noise: model time below ``tau`` × the time range (τ is a fraction, the same for all families)."""
        return t.float() < tau * self.time_scale

    def rollout_scheduler(self, num_steps: int) -> Any:
        """A copy of the pipeline's own scheduler, set to ``num_steps`` as its pipeline sets it (for trajectories
        outside the pipeline)."""
        import copy

        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(num_steps, device=self.device)
        return scheduler

    def model_time(self, scheduler_t: torch.Tensor) -> torch.Tensor:
        """Scheduler timestep → the time value the denoiser takes (the same for DDPM t and SD3's σ·1000)."""
        return scheduler_t

    def initial_noise(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        """x_T from standard-normal ``noise`` as the pipeline's ``prepare_latents`` makes it: scaled by the (already
        set) scheduler's ``init_noise_sigma`` (√(σ_max²+1) for Euler-type schedulers), in the model's dtype."""
        # cast first, then scale: the pipelines multiply latents already in the model's dtype
        return noise.to(self.device, self.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)

    # ---- what the denoiser sees (sampler-exact) ---------------------------------------------------------------------
    def model_input(self, scheduler: Any, x: torch.Tensor, scheduler_t: torch.Tensor) -> torch.Tensor:
        """The latents the pipeline's ``__call__`` feeds the denoiser at this step: ``scale_model_input`` of the
        scheduler (x/√(σ²+1) for Euler-type schedulers, identity for DDIM/PNDM)."""
        if hasattr(scheduler, "scale_model_input"):
            return scheduler.scale_model_input(x, scheduler_t)
        return x

    def guided_prediction(self, x_in: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                          guidance: float) -> torch.Tensor:
        """The guided output the pipeline steps with: classifier-free guidance ε(∅) + g(ε(c) − ε(∅)); with g ≤ 1 the
        pipelines skip the unconditional branch, and so does this."""
        if guidance <= 1.0:
            return self.predict(x_in, t, cond)
        n = x_in.shape[0]
        out = self.predict(torch.cat([x_in, x_in]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        e_u, e_c = out[:n], out[n:]
        return e_u + guidance * (e_c - e_u)

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor,
                                                                                           torch.Tensor, torch.Tensor]:
        """The model's training example at time fraction ``u`` ∈ [0, 1) (``[B]``): (denoiser input x_t, model time,
        target) — DDPM: x_t = √ᾱ·x0 + √(1−ᾱ)·n with target n (ε) or √ᾱ·n − √(1−ᾱ)·x0 (v); flow: x_t = (1−σ)·x0 +
        σ·n with target n − x0. What textual inversion and UnlearnDiffAtk's loss denoise."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if self.time_kind == "flow":
            sigma = u.to(x0.device, torch.float32).clamp(1e-3, 1.0)
            s = sigma.view(shape).to(x0.dtype)
            return (1 - s) * x0 + s * noise, (sigma * self.time_scale).to(x0.dtype), noise - x0
        n = int(self.time_scale)
        t = (u * n).long().clamp(0, n - 1).to(x0.device)
        ac = self.pipe.scheduler.alphas_cumprod.to(x0.device)[t].view(shape).to(x0.dtype)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        return x_t, t, target

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, Any]:
        """The pipeline ``__call__`` arguments that feed ``cond`` (and ``uncond`` as the negative branch) in place of
        prompts: what an attack at the conditioning level generates with."""
        names = {"encoder_hidden_states": "prompt_embeds", "text_embeds": "pooled_prompt_embeds",
                 "pooled_projections": "pooled_prompt_embeds"}
        out: dict[str, Any] = {}
        for key, name in names.items():
            if key in cond.tensors:
                out[name] = cond.tensors[key]
                out[f"negative_{name}"] = uncond.tensors[key]
        return out

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra pipeline ``__call__`` arguments that keep generation's text features the ones stage A saw (FLUX and
        SD3: the T5 length)."""
        return {}

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` latents in the layout the pipeline's ``latents=`` argument takes (FLUX packs them)."""
        return latents

    def pipeline_guidance(self, guidance: float, batch: int) -> dict[str, Any]:
        """The pipeline ``__call__`` arguments that give ``guided_prediction``'s semantics (SD: guidance_scale)."""
        return {"guidance_scale": guidance}

    def step_kwargs(self, scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments the pipelines pass (the generator of ancestral samplers; DDIM's η=0)."""
        import inspect

        params = set(inspect.signature(scheduler.step).parameters)
        out: dict[str, Any] = {}
        if "eta" in params:
            out["eta"] = 0.0
        if "generator" in params and generator is not None:
            out["generator"] = generator
        return out

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    def linear_modules_ending(self, suffixes: tuple[str, ...]) -> list[str]:
        """Denoiser Linear layers (their peft wrappers count once, by name) whose names end with ``suffixes``."""
        return [n for n, m in self.denoiser.named_modules()
                if isinstance(getattr(m, "base_layer", m), torch.nn.Linear) and n.endswith(suffixes)]

    @abstractmethod
    def lora_target_modules(self, preset: str = "kv") -> list[str]:
        """Module names (relative to the denoiser) a LoRA targets for ``preset``."""

    def module(self, name: str) -> torch.nn.Module:
        """A denoiser submodule by name, or a text-encoder one by its qualified name (``text_encoder.text_model.…``,
        :mod:`.text_lora`); for a peft-wrapped layer, its original base layer."""
        if split_qualified(name)[0] is not None:
            return text_module(self.pipe, name)
        mod = self.denoiser.get_submodule(name)
        return getattr(mod, "base_layer", mod)
