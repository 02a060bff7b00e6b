"""TRCE (Chen et al., ICCV 2025, arXiv 2503.07389; code ddgoodgood/TRCE, SD 1.4) as a configuration of both engines.

Stage 1, closed form: MACE's refinement of the cross-attention K/V with TRCE's token classes, weighted apart (start
token, first end token, last position standing for the padding run, the concept's tokens; its configs' weights
(0, 1, 0, 0)), statistics as means over the prompt pairs and the preserved prompts, λ = 0. Its preservation is a
cached prior of 30k COCO captions scaled by ``preserve_scale`` 0.01, which its code applies twice (0.01² = 1e-4 on the
mean caption Gram); ours is the same mean over our built-in caption corpus (~120 captions), with λ_p = 1e-4.

Stage 2, trajectory (engines/trce.py): the hinge on the concept's and the empty prompt's predictions against the
original model's prefer/reject references (β 1, margin 0.01, g 15), states of the first 26 of 50 sampler steps
(its ``max_early_timestep`` 25, counted inclusively: τ = 0.48 of the time range, so 13 of our 25 rollout steps),
preservation 100 × the unconditional MSE against the stage-1 model on unconditional trajectories at any step (4
states a step), AdamW (weight decay 0.01, lr 1e-6) on self-attention and the cross-attention queries, 300 steps of
one state (its 100 trajectories × 3 epochs).

Ours: those layers as a LoRA at each layer's full rank (α = r; TRCE trains the full weights, and a full-rank LoRA
reaches every update they reach, with the stage-A/original switch and the LoRA artifact kept; the attn1 output bias
stays fixed), the safe wording is the anchor in the same template, the states come from the replay pool (sampler-
exact, 4 + 4 trajectories refreshed every 25 steps) instead of its fixed pre-generated set, and gradients are zeroed
every step (its script never zeroes them). FLUX and SD3 are refused: TRCE's token classes and layer split are
defined for CLIP-conditioned UNets only.
"""

from .base import MethodSpec

STAGE_1 = {"token_selection": "trce", "token_weights": [0.0, 1.0, 0.0, 0.0], "templates": None, "lambda_reg": 0.0,
           "lambda_preserve": 1e-4, "preserve_corpus": "builtin", "mean_statistics": True}
STAGE_2 = {"lora_targets": "self-attn+q", "rank": 0, "lr": 1e-6, "steps": 300, "batch_size": 1, "window": "early",
           "tau": 0.48, "reference": "original", "early_mode": "none", "beta": 0.0, "gamma": 0.0, "rho": 0.0,
           "rollout_guidance": 3.0, "pool_trajectories": 4, "refresh_every": 25,
           "trce_beta": 1.0, "trce_margin": 0.01, "trce_guidance": 15.0, "trce_preserve_scale": 100.0,
           "trce_preserve_batch": 4, "trce_preserve_trajectories": 4, "trce_weight_decay": 0.01}

TRCE = MethodSpec(
    name="trce",
    engine="both",
    summary="TRCE: MACE-style K/V edit on weighted start/end/key tokens, then a hinge towards the safe prompt's "
            "guided prediction on EARLY states, training self-attention and the cross-attention queries",
    defaults=STAGE_1,
    trajectory=STAGE_2,
    families=("sd", "sdxl"),
)
