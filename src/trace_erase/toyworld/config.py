"""The toy pipelines' recipe: sizes and schedule (``ToyTrainConfig``), the bundled presets, and ``KEY=VALUE``
overrides from the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import TraceEraseError

WORLDS = ("objects", "scenes")
# scene training renders start here (+ seed · 10⁷): disjoint from the single-object training seeds (0 ..), the scene
# scorer's training (10⁶ ..) and held-out (9·10⁶ ..) renders and the tests' (8·10⁶ ..)
SCENE_FIRST_SEED = 20_000_000
# (left, right) class pairs no scene training picture shows: the scene check's two-object prompts use only these, so
# its captions are held out of training (each class is still seen on each side, with other partners)
SCENE_HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "star"), ("square", "cross"), ("triangle", "heart"), ("star", "crescent"), ("cross", "arrow"),
    ("heart", "diamond"), ("crescent", "house"), ("arrow", "circle"), ("diamond", "square"), ("house", "triangle"),
)
# the scene fine-tunes' (steps, lr) per family, sized to ≈ 60–90 min at one thread on the shared 2-core machine:
# toy-sd-scenes 1.2–1.5 s/step; toy-flux-scenes 1.53 s/step measured beside three other jobs (1.7× toy-flux's step
# then: 128 image tokens instead of 64), ≈ 1.1 s beside one; lr below the single-object recipes' (4e-4, 5e-4)
SCENE_SCHEDULE: dict[str, tuple[int, float]] = {"sd": (4000, 3e-4), "flux": (3500, 4e-4)}
# left out of key() at their defaults: older partial runs resume
NEW_FIELDS = ("world", "image_width", "init_from", "init_parts", "noise_shift", "noise_schedule")
# sd only: "epsilon" (SD 1.x: ε-prediction on the scaled-linear betas, whose last step keeps √ᾱ = 0.068 of the
# picture) or "v-zero-snr" (v-prediction on the same betas rescaled to zero terminal SNR, trailing timesteps:
# Lin et al. 2024), where the sampler's first step is pure noise in training too, so a layout cannot leak through it
NOISE_SCHEDULES = ("epsilon", "v-zero-snr")


@dataclass
class ToyTrainConfig:
    """Sizes and schedule of one toy pipeline (``preset('sd')``, ``preset('flux')``, or ``micro`` for tests)."""

    family: str = "sd"
    world: str = "objects"  # "objects": one shape per picture; "scenes": two slots, left and right (toyworld/scenes)
    seed: int = 0
    n_images: int = 30000
    image_size: int = 32  # the height (and the width when image_width is None)
    image_width: int | None = None  # None: square; the scene world is 64 wide × 32 high
    max_tokens: int = 24
    text_width: int = 64
    text_layers: int = 3
    vae_channels: tuple[int, ...] = (24, 48)  # one level per entry; the latent side is image_size / 2**(levels-1)
    latent_channels: int = 4
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_from: str | None = None  # reuse a trained toy pipeline's VAE (folder or bundled name); skips VAE training
    # fine-tune: start the text encoder(s) and the denoiser from this trained toy pipeline (same sizes; its tokenizer
    # extended by the world's new words, which get new embedding rows) instead of random weights; needs vae_from
    init_from: str | None = None
    # what init_from gives: "all" (text encoders and denoiser) or "text" (the text encoders and tokenizers only; the
    # denoiser starts from random weights of this recipe's sizes, e.g. a UNet with one more level)
    init_parts: str = "all"
    widths: tuple[int, ...] = (32, 64, 128)  # UNet block widths (sd); cross-attention at the two coarser levels
    flux_layers: tuple[int, int] = (2, 2)  # double-, single-stream blocks (flux)
    flux_heads: int = 4
    flux_head_dim: int = 32
    steps: int = 4000
    cycles: int = 1  # cosine cycles; each restart continues from the EMA weights with a fresh optimizer
    batch: int = 64
    lr: float = 4e-4
    caption_dropout: float = 0.1
    snr_gamma: float | None = None  # sd only: min-SNR loss weighting min(SNR, γ)/SNR (Hang et al. 2023); none: plain
    # the training noise levels, shifted towards noise by s·u / (1 + (s − 1)·u) (SD3's resolution shift, Esser et al.
    # 2024): 1 leaves them as drawn; > 1 trains more where the picture's layout is still undecided (scenes: 2× wider)
    noise_shift: float = 1.0
    noise_schedule: str = "epsilon"  # sd only: epsilon | v-zero-snr (NOISE_SCHEDULES)
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    sampler_steps: int = 25
    sampler_guidance: float = 8.0

    @property
    def cycle_steps(self) -> int:
        return self.steps // self.cycles

    @property
    def height_width(self) -> tuple[int, int]:
        """Pixel (height, width) of the pictures."""
        return self.image_size, self.image_width or self.image_size

    @property
    def name(self) -> str:
        """The bundled name of a model made with this recipe's family and world (toy-sd, toy-sd-scenes, …)."""
        return f"toy-{self.family}" + ("-scenes" if self.world == "scenes" else "")

    def key(self) -> str:
        """Hash of the settings: a partial run only resumes with identical settings."""
        settings = dataclasses.asdict(self)
        for k in NEW_FIELDS:
            if settings[k] == getattr(ToyTrainConfig, k):
                del settings[k]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def preset(family: str, micro: bool = False, scenes: bool = False) -> ToyTrainConfig:
    """The bundled models' settings, or a micro version for tests (seconds, not minutes); ``scenes``: the scene
    world's model of the family (toy-sd-scenes, toy-flux-scenes), fine-tuned from the single-object one."""
    if family not in ("sd", "flux"):
        raise TraceEraseError(f"unknown toy family '{family}'; use sd or flux")
    cfg = ToyTrainConfig(family=family)
    if family == "sd":  # two cosine cycles: the second restarts from the first's EMA weights
        cfg = dataclasses.replace(cfg, steps=8000, cycles=2)
    if family == "flux":  # shares toy-sd's VAE (train sd first): one autoencoder for the toy world; three cycles
        cfg = dataclasses.replace(cfg, lr=5e-4, steps=12000, cycles=3, sampler_steps=20, sampler_guidance=4.0,
                                  vae_from="toy-sd")
    if scenes:  # fine-tune the single-object model on 64×32 two-slot scenes: toy-sd's VAE as is (toy-flux shares
        # it), the denoiser and text encoder(s) as the start; one cycle sized to ≈ 60–90 min at one thread
        steps, lr = SCENE_SCHEDULE[family]
        cfg = dataclasses.replace(cfg, world="scenes", image_width=64, n_images=20000, vae_from="toy-sd",
                                  init_from=f"toy-{family}", steps=steps, cycles=1, lr=lr, checkpoint_every=250)
    if micro:
        cfg = dataclasses.replace(
            cfg, n_images=64, text_width=16, text_layers=1, vae_channels=(8, 8), vae_steps=3, vae_batch=8,
            widths=(16, 16, 16), flux_layers=(1, 1), flux_heads=2, flux_head_dim=16, steps=6, cycles=1, batch=8,
            checkpoint_every=2, sampler_steps=2, vae_from=None, init_from=None,
        )
    return cfg


def check_recipe(cfg: ToyTrainConfig) -> None:
    """One line for a recipe that cannot train: an unknown world, scene pictures of another size, a fine-tune start
    without the VAE its denoiser was trained on."""
    if cfg.world not in WORLDS:
        raise TraceEraseError(f"unknown world '{cfg.world}'; use {' or '.join(WORLDS)}")
    if cfg.world == "scenes" and cfg.height_width != (32, 64):
        raise TraceEraseError(f"scene pictures are 32 high × 64 wide (got {cfg.height_width[0]}×"
                              f"{cfg.height_width[1]}); drop the image_size / image_width settings")
    if cfg.world == "objects" and cfg.image_width not in (None, cfg.image_size):
        raise TraceEraseError("single-object pictures are square; drop image_width (or train with --scenes)")
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise TraceEraseError(f"noise_schedule '{cfg.noise_schedule}' is not one of {', '.join(NOISE_SCHEDULES)}")
    if cfg.noise_schedule != "epsilon" and cfg.family != "sd":
        raise TraceEraseError("noise_schedule sets toy-sd's DDPM schedule; the flux recipe has its own (drop it)")
    if cfg.noise_schedule != "epsilon" and cfg.snr_gamma is not None:
        raise TraceEraseError("snr_gamma weighs the ε-prediction loss; drop it with noise_schedule=v-zero-snr")
    if cfg.noise_shift <= 0:
        raise TraceEraseError(f"noise_shift must be > 0 (1 leaves the noise levels as drawn; got {cfg.noise_shift})")
    if cfg.init_parts not in ("all", "text"):
        raise TraceEraseError(f"init_parts '{cfg.init_parts}' is not one of all, text")
    if cfg.init_parts == "text" and cfg.init_from is None:
        raise TraceEraseError("init_parts=text takes the text encoders from init_from; set init_from as well")
    if cfg.init_from is not None and cfg.vae_from is None:
        raise TraceEraseError("init_from needs vae_from: the denoiser it starts from was trained on that VAE's "
                              "latents (e.g. --set vae_from=toy-sd)")


OWN_OPTIONS = ("family", "seed", "steps", "cycles", "batch")  # settable by their own CLI options, not by --set


def override(cfg: ToyTrainConfig, assignments: list[str]) -> ToyTrainConfig:
    """``cfg`` with ``KEY=VALUE`` settings applied, each parsed to the field's type (tuples as ``24,48,64``; ``none``
    for an optional field; counts and sizes ≥ 1); recipe experiments are run this way, so the command line records
    them."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cfg) if f.name not in OWN_OPTIONS}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in OWN_OPTIONS:
            raise TraceEraseError(f"'{item}': use --{key} instead of --set")
        if not sep or key not in kinds:
            raise TraceEraseError(f"cannot set '{item}'; use KEY=VALUE with KEY one of: {', '.join(kinds)}")
        kind, raw = kinds[key], raw.strip()
        try:
            if kind.endswith("| None") and raw.lower() == "none":
                value: Any = None
            elif kind.startswith("tuple"):
                value = tuple(int(v) for v in raw.split(","))
            elif kind.startswith("int"):
                value = int(raw)
            elif kind.startswith("float"):
                value = float(raw)
                if not math.isfinite(value) or value < 0:
                    raise ValueError
            else:
                value = raw
            if any(isinstance(v, int) and v < 1 for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError
        except ValueError:
            example = getattr(cfg, key)
            raise TraceEraseError(f"'{item}': {key} takes {kind}" + (f" like {example!r}" if example is not None
                                  else "") + (" (each ≥ 1)" if kind.startswith(("int", "tuple")) else "")
                                  + (" (finite, ≥ 0)" if kind.startswith("float") else "")) from None
        changes[key] = value
    return dataclasses.replace(cfg, **changes)
