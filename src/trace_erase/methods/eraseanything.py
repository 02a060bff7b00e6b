"""EraseAnything (Gao et al., ICML 2025), FLUX's own erasure baseline, as a trajectory-engine configuration.

As its training script and config: LoRA rank 8 (α = rank) on ``add_k_proj``/``add_q_proj`` of the double-stream
blocks, lr 1e-3, 200 steps, 28 sampler steps at guidance 3, η = 1, and bi-level steps alternating between the upper
loss (ESD's reversed velocity at every time + 0.001 × the attention regulariser on the concept's tokens) and the
lower loss (0.1 × flow matching on images of the concept + 0.1 × the reverse self-contrastive term, 3 irrelevant
concepts, temperature 0.07). What is ours (engines/eraseanything.py says each): the map and regulariser's exact
form, the self-contrast negative, irrelevant prompts from ``preserve`` or our caption corpus (no LLM), the base
model's pool images (no image folder), and states from the stage-A model's replay pool refreshed every 10 steps
(its script samples each state from the model being trained, as ESD does; our ESD configurations use the pool too).
Its ESD "unconditional" is a concept-free prompt; ours is the empty prompt, as in our ESD.
"""

from .base import MethodSpec

ERASEANYTHING = MethodSpec(
    name="eraseanything",
    engine="trajectory",
    summary="EraseAnything (FLUX): ESD velocity reversal + attention regulariser, alternating with flow matching "
            "and a contrastive term; LoRA on add_k/add_q",
    trajectory={"window": "all", "early_mode": "none", "eta": 1.0, "beta": 0.0, "gamma": 0.0,
                "lora_targets": "kq", "rank": 8, "lr": 1e-3, "steps": 200, "rollout_steps": 28,
                "rollout_guidance": 3.0, "refresh_every": 10, "bilevel": True, "attention_weight": 1e-3,
                "flow_weight": 0.1, "contrast_weight": 0.1, "contrast_irrelevant": 3, "contrast_temperature": 0.07},
    families=("flux",),
)
