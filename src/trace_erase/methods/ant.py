"""ANT (Li et al. 2025) as a trajectory-engine configuration.

Positive guidance before an early cut-off (the first ~5 of 50 steps, i.e. τ = 0.9 of the time range), reversed
guidance after it, and an unconditional-preservation term; LoRA on cross-attention (ANT also allows full-model
fine-tuning: out of scope here).
"""

from .base import MethodSpec

ANT = MethodSpec(
    name="ant",
    engine="trajectory",
    summary="ANT: positive guidance before an early cut-off, reversed after it, unconditional terms kept",
    trajectory={"window": "two", "early_mode": "positive", "tau": 0.9, "eta": 1.0, "beta": 1.0, "gamma": 0.5,
                "lora_targets": "cross-attn", "rank": 4, "lr": 1e-4, "steps": 1000, "rollout_guidance": 3.0},
)
