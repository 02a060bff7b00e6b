"""MACE's closed-form refinement step (Lu et al. 2024), without its masked-attention LoRA stage.

MACE refines the projections so the words *around* the concept stop carrying it (the concept word itself is left
to MACE's later LoRA stage): here, positions after the concept in ~30 augmented prompts, mapped to the anchor
prompt's aligned positions.
"""

from .base import MethodSpec

MACE_CFR = MethodSpec(
    name="mace-cfr",
    engine="closed_form",
    summary="MACE-CFR: tokens after the concept (co-existing words, padding) in ~30 prompts → anchor",
    defaults={"token_selection": "context", "templates": None, "lambda_reg": 0.1, "lambda_preserve": 1.0},
)
