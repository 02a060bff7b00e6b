"""The trajectory engine's options (TRACE stage B's defaults; ESD and ANT override a few) and their validation.

:class:`TrajectoryConfig` holds the training knobs; the optional parts are typed sub-configs, each ``None`` when off,
as peft keeps ``LoftQConfig`` beside ``LoraConfig``: :class:`AdversarialConfig` (the defence against word-level
attacks), :class:`EraseAnythingConfig` (its attention and bilevel terms), :class:`TrceConfig` (TRCE's hinge and
preservation terms), :class:`AdvUnlearnConfig` (AdvUnlearn's terms on a text-encoder LoRA), :class:`PreimageConfig`
(the preimage branch: the concept trained through the conditioning that undoes stage A), :class:`BankConfig` (the
bank branch: adversarial conditionings searched once against the stage-A model, then erased) and :class:`FusionConfig`
(how per-concept LoRAs are integrated), all in :mod:`.sub_configs`. Users set them with flat option
keys (``--option adversarial_every=25``, YAML ``flow_weight: 0.1``): :meth:`TrajectoryConfig.from_options` reads
those keys (and nested ones), :meth:`TrajectoryConfig.options` writes them back. A field whose metadata says
``resume_free`` may change when an interrupted run resumes: it does not alter the trained weights.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import TraceEraseError
from ..models.text_lora import TEXT_LORA_PRESETS
from ..runtime import ATTENTION_KERNELS
from .prompts import ATTRIBUTE_TRAIN_TEMPLATES, corpus_path
from .sub_configs import (
    OMITTED_AT_DEFAULT,
    RESUME_FREE,
    AdversarialConfig,
    AdvUnlearnConfig,
    BankConfig,
    EraseAnythingConfig,
    FusionConfig,
    PreimageConfig,
    TrceConfig,
)
from .windows import check_windows

WINDOWS = ("two", "late", "all", "early")
MULTI_MODES = ("fuse", "joint", "sum")
EARLY_MODES = ("keep", "positive", "none")
REFERENCES = ("stage-a", "original", "anchor", "to-anchor")


SUB_CONFIGS = {"adversarial": AdversarialConfig, "eraseanything": EraseAnythingConfig, "trce": TrceConfig,
               "fusion": FusionConfig, "advunlearn": AdvUnlearnConfig, "preimage": PreimageConfig,
               "bank": BankConfig}


def _sub_keys(name: str) -> dict[str, str]:
    """Option key → field name of sub-config ``name``."""
    cls = SUB_CONFIGS[name]
    keys = getattr(cls, "KEYS", None)
    return {(keys[f.name] if keys else cls.PREFIX + f.name): f.name for f in dataclasses.fields(cls)}


@dataclass
class TrajectoryConfig:
    """Knobs of the trajectory engine (defaults are TRACE stage B's; methods override a few); build it from option
    keys with :meth:`from_options`."""

    # preset: kv | cross-attn | attn | self-attn+q (TRCE) | non-cross (ESD-u) | kq (FLUX) | text_encoder_full (the
    # text encoders' layers instead of the denoiser's: AdvUnlearn, with its ``advunlearn`` terms)
    lora_targets: str = "kv"
    rank: int = 4  # 0: each layer's full rank min(in, out), α = rank (what full-weight training reaches)
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 2  # states per optimizer micro-step
    grad_accum: int = 1
    eta: float = 1.0  # strength of the reversed (or positive, ANT-early) guidance target
    tau: float = 0.5  # EARLY/LATE split as a fraction of the model's time (DDPM t/T, flow σ)
    # two: EARLY keep + LATE erase | late: sample only LATE states | all: erase everywhere (ESD) | early: sample only
    # EARLY states (TRCE's terms)
    window: str = "two"
    early_mode: str = "keep"  # what the keep window's states learn: keep (TRACE) | positive (ANT) | none
    # which side of τ window=two keeps the field at: "noisy" (EARLY, t ≥ τ; erase at LATE) or "clean" (LATE, t < τ;
    # erase at EARLY: ANT's single-concept code). engines/windows.py
    keep_end: str = field(default="noisy", metadata=OMITTED_AT_DEFAULT)
    # how a window=two batch is drawn: "pool" (uniform over each trajectory's steps, so each window gets states in
    # proportion to its length) or "balanced" (half the batch from each window, as ANT's code draws them)
    window_sampling: str = field(default="pool", metadata=OMITTED_AT_DEFAULT)
    # which model gives the concept direction ε_r(c) − ε_r(∅) and rolls out the trajectories: "stage-a" (θ*, the
    # model stage B starts from) or "original" (θ0, before stage A; the same as θ* for methods without stage A).
    # "anchor" (ours): LATE target ε*(c) − η(ε0(c) − ε0(anchor prompt)), θ*'s trajectories — away from the concept
    # as θ0 tells it from its anchor, so stage B cannot push back past the anchor (e.g. towards a removed style).
    # "to-anchor" (ours; Concept Ablation's target, Kumari et al. 2023, in the LATE window): ε0(anchor prompt) −
    # (η − 1)(ε0(c) − ε0(anchor prompt)) — the anchor's own prediction at η = 1, past it for η > 1; it does not read
    # θ*, so it erases as much where stage A failed as where it worked
    reference: str = "stage-a"
    # which model the LoRA trains on top of (ours): "stage-a" (θ*, stage A on while it trains) or "original" (θ0:
    # stage B trained as if there were no stage A — its rollouts, targets and keep terms all θ0's — then stacked on
    # stage A). "original" lets stage B meet the concept's original conditioning, which word-level attacks rebuild
    # through the edited projections; with it every reference reads θ0.
    stage_b_base: str = field(default="stage-a", metadata=OMITTED_AT_DEFAULT)
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
    # also sample them under generic attribute phrases (prompts.ATTRIBUTE_TRAIN_TEMPLATES; ours): see training_templates
    attribute_contexts: bool = field(default=False, metadata=OMITTED_AT_DEFAULT)
    # gated adapter: at inference the stage-B LoRA acts only for t < gate_tau
    gate_tau: float | None = field(default=None, metadata=RESUME_FREE)
    checkpoint_every: int = field(default=100, metadata=RESUME_FREE)
    gradient_checkpointing: bool = False
    # SDPA kernels the backward pass may use on CUDA: auto (all but cuDNN's, whose bf16 backward gives NaN gradients
    # on H100/H200 at some shapes; a step whose gradients are still not finite is recomputed with math, which the run
    # then keeps) | math (the reference kernel alone) | torch (torch's own choice). runtime.training_attention
    attention_kernels: str = field(default="auto", metadata=RESUME_FREE)
    # "sequential": each trained branch (c, ∅, p) runs and backpropagates on its own — peak activation memory of
    # one branch (ours; the default). "batched": one call for all branches (faster on a GPU with memory to spare).
    branches: str = "sequential"
    seed: int = 0
    # several concepts: "joint" (one LoRA, a concept sampled per step), "sum" (one LoRA per concept, added) or
    # "fuse" (one per concept, closed-form integration over each concept's tokens; engines/fusion.py). None: the
    # method's default.
    multi: str | None = field(default=None, metadata=RESUME_FREE)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    adversarial: AdversarialConfig | None = None
    eraseanything: EraseAnythingConfig | None = None
    trce: TrceConfig | None = None
    advunlearn: AdvUnlearnConfig | None = None
    preimage: PreimageConfig | None = None
    bank: BankConfig | None = None

    def __post_init__(self) -> None:
        for name, cls in SUB_CONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):  # a nested mapping (a manifest, a YAML file)
                setattr(self, name, cls(**value))
        self._check()

    def _check(self) -> None:
        if self.window not in WINDOWS:
            raise TraceEraseError(f"unknown window '{self.window}'; choose one of {', '.join(WINDOWS)}")
        if self.reference not in REFERENCES:
            raise TraceEraseError(f"unknown reference '{self.reference}'; choose one of {', '.join(REFERENCES)}")
        if self.early_mode not in EARLY_MODES:
            raise TraceEraseError(f"unknown early_mode '{self.early_mode}'; choose one of {', '.join(EARLY_MODES)}")
        if not 0.0 < self.tau <= 1.0:
            raise TraceEraseError("tau must be in (0, 1]: a fraction of the model's time range")
        check_windows(self.window, self.keep_end, self.window_sampling, self.batch_size, self.tau)
        if self.gate_tau is not None and not 0.0 < self.gate_tau <= 1.0:
            raise TraceEraseError("gate_tau must be in (0, 1]")
        if self.gate_tau is not None and self.keep_end == "clean":
            raise TraceEraseError("gate_tau lets the LoRA act only at the clean end, where keep_end=clean trains it "
                                  "to keep the field; drop gate_tau or keep_end")
        if self.multi is not None and self.multi not in MULTI_MODES:
            raise TraceEraseError(f"unknown multi '{self.multi}'; choose one of {', '.join(MULTI_MODES)}")
        if self.attention_kernels not in ATTENTION_KERNELS:
            raise TraceEraseError(f"unknown attention_kernels '{self.attention_kernels}'; choose one of "
                                  f"{', '.join(ATTENTION_KERNELS)}")
        if self.stage_b_base not in ("stage-a", "original"):
            raise TraceEraseError(f"stage_b_base must be 'stage-a' or 'original', not '{self.stage_b_base}'")
        if self.branches not in ("sequential", "batched"):
            raise TraceEraseError(f"branches must be 'sequential' or 'batched', not '{self.branches}'")
        if self.rank < 0:
            raise TraceEraseError(f"rank must be ≥ 1, or 0 for each layer's full rank (got {self.rank})")
        self._check_trce()
        self._check_text_encoder()
        for name in ("steps", "batch_size", "grad_accum", "rollout_steps", "pool_trajectories",
                     "refresh_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TraceEraseError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        for name in ("beta", "gamma", "rho", "eta", "rollout_guidance"):
            if getattr(self, name) < 0:
                raise TraceEraseError(f"{name} must be ≥ 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise TraceEraseError(f"lr must be > 0 (got {self.lr})")
        if not self.train_templates:
            raise TraceEraseError("train_templates is empty; give at least '{}'")
        if self.pres_corpus and self.rho <= 0:
            raise TraceEraseError("pres_corpus is only read by L_pres; set rho > 0 as well (e.g. rho=0.5)")
        if self.pres_corpus:
            corpus_path(self.pres_corpus)

    def _check_trce(self) -> None:
        """TRCE's terms replace the engine's losses: refuse the settings they would silently ignore."""
        if self.trce is None:
            if self.window == "early":
                raise TraceEraseError("window=early samples only EARLY states, where no engine loss erases; it is for "
                                      "TRCE's terms (set trce_beta > 0) — use window=two or all")
            return
        if self.window == "two":
            raise TraceEraseError("TRCE's terms sample one window; set window=early (TRCE's), late or all")
        ignored = [k for k in ("beta", "gamma", "rho") if getattr(self, k) > 0] + (
            ["early_mode"] if self.early_mode != "none" else [])
        others = [k for k in ("adversarial", "eraseanything", "preimage", "bank") if getattr(self, k) is not None]
        if ignored or others:
            raise TraceEraseError(f"TRCE's terms replace the engine's losses; switch off {', '.join(ignored + others)} "
                                  "(beta=0, gamma=0, rho=0, early_mode=none, adversarial_every=0, eraseanything off, "
                                  "preimage_weight=0, bank_weight=0)")

    @property
    def training_templates(self) -> list[str]:
        """The templates every stage-B prompt is built from: ``train_templates``, plus the attribute contexts when
        ``attribute_contexts`` is on."""
        return list(self.train_templates) + (list(ATTRIBUTE_TRAIN_TEMPLATES) if self.attribute_contexts else [])

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the LoRA is on the text encoders (AdvUnlearn) rather than the denoiser."""
        return self.lora_targets in TEXT_LORA_PRESETS

    def _check_text_encoder(self) -> None:
        """AdvUnlearn's terms and the text-encoder LoRA go together, and replace the engine's window and keep terms:
        refuse the settings they would silently ignore."""
        if self.advunlearn is not None and not self.trains_text_encoder:
            raise TraceEraseError("the advunlearn_* options train the text encoder; set lora_targets="
                                  f"{next(iter(TEXT_LORA_PRESETS))} (as --method advunlearn does) or drop them")
        if not self.trains_text_encoder:
            return
        if self.advunlearn is None:
            raise TraceEraseError(f"lora_targets={self.lora_targets} is AdvUnlearn's text-encoder LoRA; use "
                                  "--method advunlearn")
        ignored = [k for k in ("beta", "gamma", "rho") if getattr(self, k) > 0] + [
            k for k, off in (("window", "all"), ("early_mode", "none")) if getattr(self, k) != off] + [
            k for k in ("pres_corpus", "gate_tau", "trce", "eraseanything", "preimage", "bank")
            if getattr(self, k) is not None]
        if self.reference in ("anchor", "to-anchor"):
            ignored.append("reference")
        if self.adversarial is not None and self.adversarial.weight != 1.0:
            ignored.append("adversarial_weight")  # its erase term is on the adversarial prompt alone
        if ignored:
            raise TraceEraseError(f"AdvUnlearn's text-encoder LoRA erases at every step with its own terms; drop "
                                  f"{', '.join(ignored)} (window=all, early_mode=none, beta=gamma=rho=0, no gate)")
        if self.multi in ("fuse", "sum"):
            raise TraceEraseError(f"--multi {self.multi} combines per-concept denoiser LoRAs; AdvUnlearn trains one "
                                  "text-encoder LoRA for all concepts: use --multi joint")

    # ---- option keys ---------------------------------------------------------------------------------------------
    @classmethod
    def option_keys(cls) -> list[str]:
        """Every key ``--option`` / YAML accept: the top-level fields and each sub-config's flat keys."""
        top = [f.name for f in dataclasses.fields(cls) if f.name not in SUB_CONFIGS]
        return top + [key for name in SUB_CONFIGS for key in _sub_keys(name)]

    @classmethod
    def from_options(cls, values: dict[str, Any] | None = None, /, where: str = "options", **kw: Any
                     ) -> TrajectoryConfig:
        """The config of flat option keys (``adversarial_every=25``; ``adversarial_every=0`` switches the defence
        off) or nested sub-config mappings, refusing unknown keys (with the valid ones) and values of the wrong type,
        naming the option. Erasures written before the sub-configs existed store flat keys: they load as they are."""
        from ..config import check_value

        values = {**(values or {}), **kw}
        top = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = [k for k in values if k not in top and not any(k in _sub_keys(n) for n in SUB_CONFIGS)]
        if unknown:
            valid = ", ".join(sorted(cls.option_keys()))
            raise TraceEraseError(f"unknown {where} {sorted(unknown)}; valid keys: {valid}")
        out: dict[str, Any] = {}
        for name, cls_sub in SUB_CONFIGS.items():
            keys = _sub_keys(name)
            flat = {keys[k]: v for k, v in values.items() if k in keys}
            nested = values.get(name)
            if isinstance(nested, dict):
                flat = {**nested, **flat}
            elif nested is not None and not isinstance(nested, cls_sub):
                raise TraceEraseError(f"option '{name}' takes a mapping of its keys ({', '.join(keys)})")
            elif isinstance(nested, cls_sub):
                flat = {**dataclasses.asdict(nested), **flat}
            sub_hints = typing.get_type_hints(cls_sub)
            inv = {v: k for k, v in keys.items()}
            flat = {f: check_value(inv.get(f, f), v, sub_hints[f]) if f in sub_hints else v for f, v in flat.items()}
            if name == "fusion":
                out[name] = cls_sub(**flat)
            elif name == "adversarial" and flat:
                out[name] = _adversarial(flat)
            elif flat:
                sub = cls_sub(**flat)
                out[name] = sub if sub.active else None
            if flat and out.get(name) is None:
                _refuse_unread(name, flat)
        for key, value in values.items():
            if key in top and key not in SUB_CONFIGS:
                out[key] = check_value(key, value, hints[key])
        return cls(**out)

    def options(self) -> dict[str, Any]:
        """The flat option keys and values this config stands for (an off sub-config writes its defaults, with
        ``adversarial_every=0``, or nothing when it says ``WRITTEN_WHEN_OFF = False``; a field marked
        ``omitted_at_default`` is left out at its default): what a run's settings hash and what
        :meth:`from_options` reads back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SUB_CONFIGS
               and not (f.metadata.get("omitted_at_default") and getattr(self, f.name) == f.default)}
        for name, cls_sub in SUB_CONFIGS.items():
            sub = getattr(self, name)
            if sub is None and not getattr(cls_sub, "WRITTEN_WHEN_OFF", True):
                continue
            values = dataclasses.asdict(sub) if sub is not None else {
                **dataclasses.asdict(cls_sub()), **({"every": 0} if name == "adversarial" else {})}
            omit = {f.name for f in dataclasses.fields(cls_sub) if f.metadata.get("omitted_at_default")
                    and values[f.name] == f.default}
            out.update({key: values[f] for key, f in _sub_keys(name).items() if f not in omit})
        return out

    @classmethod
    def resume_free_keys(cls) -> set[str]:
        """The option keys a resumed run may change (the fields marked ``resume_free``)."""
        keys = {f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_free")}
        for name, cls_sub in SUB_CONFIGS.items():
            names = _sub_keys(name)
            free = {f.name for f in dataclasses.fields(cls_sub) if f.metadata.get("resume_free")}
            keys |= {key for key, f in names.items() if f in free}
        return keys


SWITCHES = {"adversarial": "adversarial_every > 0 (e.g. 25)", "eraseanything": "attention_weight > 0 or bilevel=true",
            "trce": "trce_beta > 0 (e.g. 1.0)", "advunlearn": "lora_targets=text_encoder_full",
            "preimage": "preimage_weight > 0 (e.g. 1.0)", "bank": "bank_weight > 0 (e.g. 1.0)"}


def _refuse_unread(name: str, flat: dict[str, Any]) -> None:
    """An off sub-config's keys at values other than its defaults would be silently dropped: refuse them in one line
    naming the switch. (Its defaults pass, as erasures of formats 1 and 2 store every key.)"""
    cls_sub = SUB_CONFIGS[name]
    defaults = dataclasses.asdict(cls_sub())
    switch = {"adversarial": "every", "eraseanything": None, "trce": "beta", "advunlearn": None,
              "preimage": "weight", "bank": "weight"}[name]
    changed = [f for f, v in flat.items() if f != switch and f in defaults and v != defaults[f]]
    if changed:
        key = {v: k for k, v in _sub_keys(name).items()}[changed[0]]
        raise TraceEraseError(f"{key} is read only when {name} is on; set {SWITCHES[name]} as well, or drop {key}")


def _adversarial(flat: dict[str, Any]) -> AdversarialConfig | None:
    """The defence's sub-config from its keys; ``every`` 0 (the flat default) is off — its other keys are still
    checked, so a bad value is refused whether or not the defence runs."""
    every = flat.get("every", 0)
    if every < 0:
        raise TraceEraseError(f"adversarial_every must be ≥ 0 (got {every})")
    config = AdversarialConfig(**{**flat, "every": max(every, 1)})
    return config if every > 0 else None
