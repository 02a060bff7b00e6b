"""ANT (Li et al. 2025) as a trajectory-engine configuration.

Positive guidance before an early cut-off, reversed guidance after it, and an unconditional-preservation term; LoRA
on cross-attention (ANT also allows full-model fine-tuning: out of scope here). The field is kept at the noisy start,
the first 7 of 50 steps from pure noise (t ≥ 860, τ = 0.86 of the time range), as the paper's text and its
multi-concept code do (4 of 50 there); its single-concept code keeps it at the clean end instead (t < 140) — a
reading not yet measured here. Weights α₁ = 1 on the early term and α₂ = 0.5 on the unconditional one (its
single-concept code computes the unconditional terms without gradient; its multi-concept code weighs them 2.5 and
1.25). Our pool sampling draws states from both windows in proportion to their length, where its code draws one
state from each window per iteration. With η = 1 the positive-guidance target ε*(∅) + η(ε*(c) − ε*(∅)) is θ*'s own
prediction ε*(c): the early term keeps the field (η = 1).

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
