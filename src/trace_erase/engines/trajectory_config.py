"""The trajectory engine's options (TRACE stage B's defaults; ESD and ANT override a few) and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TraceEraseError
from ..runtime import ATTENTION_KERNELS
from .prompts import corpus_path

WINDOWS = ("two", "late", "all")
# options a resumed run may change: they do not alter the trained weights
RESUME_FREE = ("checkpoint_every", "gate_tau", "multi", "fusion_lambda", "fusion_lambda_preserve", "attention_kernels")
MULTI_MODES = ("fuse", "joint", "sum")
EARLY_MODES = ("keep", "positive", "none")
REFERENCES = ("stage-a", "original")


@dataclass
class TrajectoryConfig:
    """Knobs of the trajectory engine (defaults are TRACE stage B's; methods override a few)."""

    lora_targets: str = "kv"  # preset: kv | cross-attn | attn | non-cross (ESD-u) | kq (FLUX)
    rank: int = 4
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 2  # states per optimizer micro-step
    grad_accum: int = 1
    eta: float = 1.0  # strength of the reversed (or positive, ANT-early) guidance target
    tau: float = 0.5  # EARLY/LATE split as a fraction of the model's time (DDPM t/T, flow σ)
    window: str = "two"  # two: EARLY keep + LATE erase | late: sample only LATE states | all: erase everywhere (ESD)
    early_mode: str = "keep"  # what EARLY states learn: keep (TRACE) | positive (ANT) | none
    # which model gives the concept direction ε_r(c) − ε_r(∅) and rolls out the trajectories: "stage-a" (θ*, the
    # model stage B starts from) or "original" (θ0, before stage A; the same as θ* for methods without stage A)
    reference: str = "stage-a"
    beta: float = 0.5  # weight of the EARLY term
    gamma: float = 0.5  # weight of L_unc (unconditional field kept)
    rho: float = 0.0  # weight of L_pres over preserve prompts
    # text file or "builtin": captions L_pres also samples, besides the concepts' preserve prompts (ours; the
    # captions naming a concept or its anchor are dropped, as in the closed-form engine). Needs rho > 0.
    pres_corpus: str | None = None
    rollout_steps: int = 25  # sampler steps of the stage-A model's trajectories
    rollout_guidance: float = 3.0
    pool_trajectories: int = 4  # trajectories held in the replay pool
    refresh_every: int = 25  # iterations between replacing the oldest trajectory
    train_templates: list[str] = field(
        default_factory=lambda: ["{}", "a photo of {}", "an image of {}", "a drawing of {}"]
    )  # prompts the trajectories are sampled under
    gate_tau: float | None = None  # (c) gated adapter: at inference the stage-B LoRA acts only for t < gate_tau
    checkpoint_every: int = 100
    gradient_checkpointing: bool = False
    # SDPA kernels the backward pass may use on CUDA: auto (all but cuDNN's, whose bf16 backward gives NaN gradients
    # on H100/H200 at some shapes; a step whose gradients are still not finite is recomputed with math, which the run
    # then keeps) | math (the reference kernel alone) | torch (torch's own choice). runtime.training_attention
    attention_kernels: str = "auto"
    # "sequential": each trained branch (c, ∅, p) runs and backpropagates on its own — peak activation memory of
    # one branch (ours; the default). "batched": one call for all branches (faster on a GPU with memory to spare).
    branches: str = "sequential"
    seed: int = 0
    # several concepts: "joint" (one LoRA, a concept sampled per step), "sum" (one LoRA per concept, added) or
    # "fuse" (one per concept, closed-form integration over each concept's tokens; engines/fusion.py). None: the
    # method's default. λ and λ_p of the integration (ours: the closed-form engine's defaults).
    multi: str | None = None
    fusion_lambda: float = 0.1
    fusion_lambda_preserve: float = 1.0
    # defence against word-level attacks (ours; engines/adversarial.py): every ``adversarial_every`` steps (0: off)
    # an inner soft-prompt attack of ``adversarial_steps`` Adam steps (lr ``adversarial_lr``) updates
    # ``adversarial_tokens`` prefix word embeddings per concept; their conditioning joins the LATE erase loss with
    # weight ``adversarial_weight``
    adversarial_every: int = 0
    adversarial_steps: int = 30
    adversarial_lr: float = 1e-2
    adversarial_tokens: int = 1
    adversarial_weight: float = 1.0
    # EraseAnything's terms (engines/eraseanything.py; FLUX only): ``bilevel`` alternates upper steps (the erase
    # loss + ``attention_weight`` × the concept tokens' attention mass) with lower steps (``flow_weight`` × flow
    # matching on the base model's images of the concept + ``contrast_weight`` × the reverse self-contrastive loss
    # against ``contrast_irrelevant`` irrelevant prompts at ``contrast_temperature``)
    bilevel: bool = False
    attention_weight: float = 0.0
    flow_weight: float = 0.0
    contrast_weight: float = 0.0
    contrast_irrelevant: int = 3
    contrast_temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise TraceEraseError(f"unknown window '{self.window}'; choose one of {', '.join(WINDOWS)}")
        if self.reference not in REFERENCES:
            raise TraceEraseError(f"unknown reference '{self.reference}'; choose one of {', '.join(REFERENCES)}")
        if self.early_mode not in EARLY_MODES:
            raise TraceEraseError(f"unknown early_mode '{self.early_mode}'; choose one of {', '.join(EARLY_MODES)}")
        if not 0.0 < self.tau <= 1.0:
            raise TraceEraseError("tau must be in (0, 1]: a fraction of the model's time range")
        if self.gate_tau is not None and not 0.0 < self.gate_tau <= 1.0:
            raise TraceEraseError("gate_tau must be in (0, 1]")
        if self.multi is not None and self.multi not in MULTI_MODES:
            raise TraceEraseError(f"unknown multi '{self.multi}'; choose one of {', '.join(MULTI_MODES)}")
        if self.fusion_lambda < 0 or self.fusion_lambda_preserve < 0:
            raise TraceEraseError("fusion_lambda and fusion_lambda_preserve must be ≥ 0")
        if self.attention_kernels not in ATTENTION_KERNELS:
            raise TraceEraseError(f"unknown attention_kernels '{self.attention_kernels}'; choose one of "
                                  f"{', '.join(ATTENTION_KERNELS)}")
        if self.branches not in ("sequential", "batched"):
            raise TraceEraseError(f"branches must be 'sequential' or 'batched', not '{self.branches}'")
        for name in ("rank", "steps", "batch_size", "grad_accum", "rollout_steps", "pool_trajectories",
                     "refresh_every", "checkpoint_every", "adversarial_steps", "adversarial_tokens",
                     "contrast_irrelevant"):
            if getattr(self, name) < 1:
                raise TraceEraseError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        for name in ("beta", "gamma", "rho", "eta", "rollout_guidance", "adversarial_every", "adversarial_weight",
                     "attention_weight", "flow_weight", "contrast_weight"):
            if getattr(self, name) < 0:
                raise TraceEraseError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        for name in ("lr", "adversarial_lr", "contrast_temperature"):
            if not getattr(self, name) > 0:
                raise TraceEraseError(f"{name} must be > 0 (got {getattr(self, name)})")
        if not self.train_templates:
            raise TraceEraseError("train_templates is empty; give at least '{}'")
        if (self.flow_weight > 0 or self.contrast_weight > 0) and not self.bilevel:
            raise TraceEraseError("flow_weight and contrast_weight act in the lower step of bilevel training; "
                                  "set bilevel=true as well")
        if self.bilevel and not (self.flow_weight > 0 or self.contrast_weight > 0):
            raise TraceEraseError("bilevel training needs a lower-step term; set flow_weight or contrast_weight > 0 "
                                  "(e.g. flow_weight=0.1)")
        if self.pres_corpus and self.rho <= 0:
            raise TraceEraseError("pres_corpus is only read by L_pres; set rho > 0 as well (e.g. rho=0.5)")
        if self.pres_corpus:
            corpus_path(self.pres_corpus)
