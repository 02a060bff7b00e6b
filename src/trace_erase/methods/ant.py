"""ANT (Li et al. 2025) as a trajectory-engine configuration.

Positive guidance before an early cut-off, reversed guidance after it, and an unconditional-preservation term; LoRA
on cross-attention (ANT also allows full-model fine-tuning: out of scope here). The cut-off is its diffusers code's
single-concept one, the first 7 of 50 steps from pure noise (τ = 0.86 of the time range; 4 of 50 for its
multi-concept runs), with its weights α₁ = 1 on the early term and α₂ = 0.5 on the unconditional one. With η = 1
the positive-guidance target ε*(∅) + η(ε*(c) − ε*(∅)) is θ*'s own prediction ε*(c): the early term keeps the field,
which is what we implement (η = 1); we have not checked a different early scale against the paper's text.

Several concepts: ANT's ``Multiple/`` code trains one LoRA per concept and merges them with MACE's closed-form
fusion, so its default is ``--multi fuse`` (our integration, engines/fusion.py, which is MACE's stage 3 written as
a LoRA), with its multi-concept cut-off, the first 4 of 50 steps (τ = 0.92).
"""

from .base import MethodSpec

ANT = MethodSpec(
    name="ant",
    engine="trajectory",
    summary="ANT: positive guidance before an early cut-off, reversed after it, unconditional terms kept",
    trajectory={"window": "two", "early_mode": "positive", "tau": 0.86, "eta": 1.0, "beta": 1.0, "gamma": 0.5,
                "lora_targets": "cross-attn", "rank": 4, "lr": 1e-4, "steps": 1000, "rollout_guidance": 3.0},
    multi_default="fuse",
    multi_trajectory={"tau": 0.92},
)
