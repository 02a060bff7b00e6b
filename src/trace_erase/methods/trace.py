"""TRACE (arXiv 2505.23312). Stage A alone: ``trace-closed-form``.

Stage A's exact form is our reconstruction (spec [R]): MACE-style surrounding tokens — the concept's tokens and
every position after it, padding included — over ~30 augmented prompts, aligned with the anchor prompt.
"""

from .base import MethodSpec

TRACE_CLOSED_FORM = MethodSpec(
    name="trace-closed-form",
    engine="closed_form",
    summary="TRACE stage A: closed-form K/V refinement on the concept and surrounding tokens of ~30 prompts",
    defaults={"token_selection": "surrounding", "templates": None, "lambda_reg": 0.1, "lambda_preserve": 1.0},
)
