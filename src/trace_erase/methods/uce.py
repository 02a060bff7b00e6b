"""UCE (Gandikota et al. 2024) as a closed-form configuration.

As in UCE's reference code: the concept text alone (no templates), from its last token through the padding,
mapped to the anchor's aligned positions; preserve concepts keep their own values.
"""

from .base import MethodSpec

UCE = MethodSpec(
    name="uce",
    engine="closed_form",
    summary="UCE: last concept token and following positions of the bare concept → anchor",
    defaults={"token_selection": "last", "templates": ["{}"], "lambda_reg": 0.1, "lambda_preserve": 1.0},
)
