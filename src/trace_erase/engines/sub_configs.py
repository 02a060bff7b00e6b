"""The trajectory engine's optional parts as typed sub-configs, each ``None`` in :class:`~.trajectory_config.
TrajectoryConfig` when off: the defence against word-level attacks, EraseAnything's, TRCE's and AdvUnlearn's terms,
the preimage and bank branches, and the fusion of per-concept LoRAs. Each names its option keys (``PREFIX`` + field, or
``KEYS``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import TraceEraseError
from .prompts import corpus_path

RESUME_FREE = {"resume_free": True}  # field metadata: a resumed run may change this option
# field metadata: options() leaves the key out at its default, so configs written before the field existed (and the
# run hashes over them) are unchanged
OMITTED_AT_DEFAULT = {"omitted_at_default": True}


def _at_least(values: dict[str, Any], names: tuple[str, ...], low: float, strict: bool = False) -> None:
    for name in names:
        value = values[name]
        if (value <= low) if strict else (value < low):
            raise TraceEraseError(f"{name} must be {'>' if strict else '≥'} {low:g} (got {value})")


@dataclass
class AdversarialConfig:
    """Defence against word-level attacks (ours; engines/adversarial.py): every ``every`` steps an inner soft-prompt
    attack of ``steps`` Adam steps (lr ``lr``) updates ``tokens`` prefix word embeddings per concept; their
    conditioning joins the LATE erase loss with weight ``weight``. Option keys: ``adversarial_<field>``."""

    every: int = 25
    steps: int = 30
    lr: float = 1e-2
    tokens: int = 1
    weight: float = 1.0

    PREFIX = "adversarial_"

    def __post_init__(self) -> None:
        flat = {self.PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        _at_least(flat, ("adversarial_every", "adversarial_steps", "adversarial_tokens"), 1)
        _at_least(flat, ("adversarial_weight",), 0)
        _at_least(flat, ("adversarial_lr",), 0, strict=True)


@dataclass
class EraseAnythingConfig:
    """EraseAnything's terms (engines/eraseanything.py; FLUX only): ``attention_weight`` × the concept tokens'
    attention mass joins the erase loss; with ``bilevel`` the steps alternate with lower steps of ``flow_weight`` ×
    flow matching on the base model's images of the concept + ``contrast_weight`` × the reverse self-contrastive loss
    against ``contrast_irrelevant`` irrelevant prompts at ``contrast_temperature``. Option keys: the field names."""

    bilevel: bool = False
    attention_weight: float = 0.0
    flow_weight: float = 0.0
    contrast_weight: float = 0.0
    contrast_irrelevant: int = 3
    contrast_temperature: float = 0.07

    PREFIX = ""

    def __post_init__(self) -> None:
        flat = dataclasses.asdict(self)
        _at_least(flat, ("contrast_irrelevant",), 1)
        _at_least(flat, ("attention_weight", "flow_weight", "contrast_weight"), 0)
        _at_least(flat, ("contrast_temperature",), 0, strict=True)
        if (self.flow_weight > 0 or self.contrast_weight > 0) and not self.bilevel:
            raise TraceEraseError("flow_weight and contrast_weight act in the lower step of bilevel training; "
                                  "set bilevel=true as well")
        if self.bilevel and not (self.flow_weight > 0 or self.contrast_weight > 0):
            raise TraceEraseError("bilevel training needs a lower-step term; set flow_weight or contrast_weight > 0 "
                                  "(e.g. flow_weight=0.1)")

    @property
    def active(self) -> bool:
        return self.bilevel or self.attention_weight > 0


@dataclass
class TrceConfig:
    """TRCE's stage-2 terms (engines/trce.py), which replace the engine's own losses when on (``beta`` > 0): on states
    of the window, the hinge ``max(0, β·(‖ε − prefer‖² − ‖ε − reject‖² + margin))`` on the trained model's concept
    and empty-prompt predictions, with prefer/reject the original model's safe/concept predictions pushed ``guidance``
    further from its unconditional one; plus ``preserve_scale`` × the MSE between the trained and the stage-A model's
    unconditional predictions on ``preserve_batch`` states, at any step, of ``preserve_trajectories`` unconditional
    trajectories. The optimiser is AdamW with ``weight_decay``. Option keys: ``trce_<field>``; an off config writes
    no keys (the settings of runs made before it are unchanged)."""

    beta: float = 0.0
    margin: float = 0.01
    guidance: float = 15.0
    preserve_scale: float = 100.0
    preserve_batch: int = 4
    preserve_trajectories: int = 2
    weight_decay: float = 0.01

    PREFIX = "trce_"
    WRITTEN_WHEN_OFF = False

    def __post_init__(self) -> None:
        flat = {self.PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        _at_least(flat, ("trce_beta", "trce_margin", "trce_guidance", "trce_preserve_scale", "trce_weight_decay"), 0)
        _at_least(flat, ("trce_preserve_batch", "trce_preserve_trajectories"), 1)

    @property
    def active(self) -> bool:
        return self.beta > 0


@dataclass
class AdvUnlearnConfig:
    """AdvUnlearn's terms (engines/advunlearn.py), on when the LoRA trains the text encoders
    (``lora_targets=text_encoder_full``): the ESD erase loss on the concept prompt for the first ``warmup`` steps,
    then on its adversarial prompt only; plus ``retain_weight`` × the MSE between the model's and the original
    model's predictions for ``retain_batch`` retain captions (``retain_corpus``: our built-in captions, or a file) on
    states of ``retain_trajectories`` of their own trajectories. The inner attack is the defence's
    (``adversarial_*``), restarted from random words (``attack_init=random``) or from its last result (``latest``),
    with plain Adam steps (``attack=pgd``) or steps on the gradient's sign (``fast_at``). Option keys:
    ``advunlearn_<field>``; an off config writes no keys."""

    retain_weight: float = 0.3
    retain_batch: int = 5
    retain_trajectories: int = 4
    retain_corpus: str = "builtin"
    warmup: int = 200
    attack: str = "pgd"
    attack_init: str = "random"

    PREFIX = "advunlearn_"
    WRITTEN_WHEN_OFF = False
    ATTACKS = ("pgd", "fast_at")
    INITS = ("random", "latest")

    def __post_init__(self) -> None:
        flat = {self.PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        _at_least(flat, ("advunlearn_retain_weight", "advunlearn_warmup"), 0)
        _at_least(flat, ("advunlearn_retain_batch", "advunlearn_retain_trajectories"), 1)
        if self.attack not in self.ATTACKS:
            raise TraceEraseError(f"unknown advunlearn_attack '{self.attack}'; choose one of {', '.join(self.ATTACKS)}")
        if self.attack_init not in self.INITS:
            raise TraceEraseError(f"unknown advunlearn_attack_init '{self.attack_init}'; choose one of "
                                  f"{', '.join(self.INITS)}")
        corpus_path(self.retain_corpus)

    @property
    def active(self) -> bool:
        return True


@dataclass
class PreimageConfig:
    """The preimage branch of stage B (engines/preimage.py; ours): the concept prompt's conditioning mapped to the
    conditioning through which the stage-A model gives back the original model's K/V (a ridge least-squares solve,
    ridge ``lam`` × the mean eigenvalue), trained as one more branch with the concept prompt's own targets, with
    weight ``weight`` (0: off). Option keys: ``preimage_<field>``; an off config writes no keys."""

    weight: float = 0.0
    lam: float = 0.01

    KEYS = {"weight": "preimage_weight", "lam": "preimage_lambda"}
    WRITTEN_WHEN_OFF = False

    def __post_init__(self) -> None:
        flat = {self.KEYS[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}
        _at_least(flat, ("preimage_weight",), 0)
        _at_least(flat, ("preimage_lambda",), 0, strict=True)

    @property
    def active(self) -> bool:
        return self.weight > 0


@dataclass
class BankConfig:
    """The bank branch of stage B (engines/bank.py; after STEREO, search then erase once): before training, per
    concept ``size`` adversarial conditionings found against the stage-A model by ``steps`` Adam steps each (lr
    ``lr``) — soft prompts of ``tokens`` prefix word embeddings and one-vector inversions, as ``kinds`` says — then one
    more branch, weight ``weight`` (0: off), pulls their predictions to the concept prompt's erase target in every
    window. Option keys: ``bank_<field>``; an off config writes no keys."""

    weight: float = 0.0
    size: int = 16
    kinds: str = "both"
    steps: int = 50
    lr: float = 1e-2
    tokens: int = 3

    KEYS = {"weight": "bank_weight", "size": "bank_size", "kinds": "bank_kinds", "steps": "bank_steps",
            "lr": "bank_lr", "tokens": "bank_tokens"}
    WRITTEN_WHEN_OFF = False
    KINDS = ("both", "soft-prompt", "inversion")

    def __post_init__(self) -> None:
        flat = {self.KEYS[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}
        _at_least(flat, ("bank_weight",), 0)
        _at_least(flat, ("bank_size", "bank_steps", "bank_tokens"), 1)
        _at_least(flat, ("bank_lr",), 0, strict=True)
        if self.kinds not in self.KINDS:
            raise TraceEraseError(f"unknown bank_kinds '{self.kinds}'; choose one of {', '.join(self.KINDS)}")
        if self.kinds == "both" and self.size < 2:
            raise TraceEraseError(f"bank_kinds=both splits the bank between soft prompts and inversions; set "
                                  f"bank_size ≥ 2 (got {self.size}) or one kind")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def sizes(self) -> dict[str, int]:
        """How many entries of each kind a concept's bank holds (``both``: soft prompts get the odd one)."""
        if self.kinds != "both":
            return {self.kinds: self.size}
        return {"soft-prompt": self.size - self.size // 2, "inversion": self.size // 2}


@dataclass
class FusionConfig:
    """How per-concept LoRAs are integrated (``multi=fuse``; engines/fusion.py): λ and λ_p of the closed form (ours:
    the closed-form engine's defaults), and ``null_space``, the share of the retained prompts' token energy whose
    directions the fused LoRA may not read (0: off; 1: their whole span, so a retained prompt's K/V are exactly the
    stage-A model's), ``preserve_growth`` and ``observed``. Option keys: ``fusion_lambda``,
    ``fusion_lambda_preserve``, ``fusion_null_space``, ``fusion_preserve_growth``, ``fusion_observed_grams``. Changing
    them re-integrates the same per-concept LoRAs, so a resumed run may."""

    lam: float = field(default=0.1, metadata=RESUME_FREE)
    lam_preserve: float = field(default=1.0, metadata=RESUME_FREE)
    null_space: float = field(default=0.0, metadata={**RESUME_FREE, **OMITTED_AT_DEFAULT})
    # λ_p × (concepts fused)^growth: 1 keeps the preserved tokens' share of G as N grows (MACE raises its preserve
    # weight with N); 0: λ_p as given
    preserve_growth: float = field(default=0.0, metadata={**RESUME_FREE, **OMITTED_AT_DEFAULT})
    # where the LoRA's modules read no fixed text features (FLUX's add_k/add_v read the text stream as each block has
    # modulated it), integrate them in closed form with Grams of their inputs observed at a few noise levels under
    # the stage-A model (the adapter's fusion_targets) instead of summing them
    observed: bool = field(default=False, metadata={**RESUME_FREE, **OMITTED_AT_DEFAULT})

    KEYS = {"lam": "fusion_lambda", "lam_preserve": "fusion_lambda_preserve", "null_space": "fusion_null_space",
            "preserve_growth": "fusion_preserve_growth", "observed": "fusion_observed_grams"}

    def __post_init__(self) -> None:
        if self.lam < 0 or self.lam_preserve < 0:
            raise TraceEraseError("fusion_lambda and fusion_lambda_preserve must be ≥ 0")
        if self.preserve_growth < 0:
            raise TraceEraseError(f"fusion_preserve_growth must be ≥ 0 (got {self.preserve_growth}); 1 grows the "
                                  "preserve weight linearly with the number of concepts")
        if not 0 <= self.null_space <= 1:
            raise TraceEraseError(f"fusion_null_space is a share of the retained tokens' energy in [0, 1] (got "
                                  f"{self.null_space}); 0 switches it off, 1 keeps retained prompts exactly")
