"""TRACE (arXiv 2505.23312): ``trace`` (stage A then stage B), ``trace-closed-form`` (stage A alone),
``trace-stage-b`` (stage B alone, for ablations) and ``trace-late-only`` (stage B trained only on states sampled from
the LATE window, one of the three readings of "only late" in docs/methods.md; the default trains two windows, and the
third, a gated adapter, is ``--gate-tau``).

Stage A's exact form is our reconstruction from the methods TRACE builds on, not the paper's text: MACE-style
surrounding tokens — the concept's tokens and every position after it, padding included — over ~30 augmented
prompts, aligned with the anchor prompt; every token of our built-in corpus of ~120 everyday captions is preserved
(an optional caption-corpus statistic; ours, not the paper's: without it, remapping the padding positions moved
unrelated prompts too). Stage B's defaults are our reconstruction's starting point (η=1, τ=0.5, β=0.5, γ=0.5,
lr 1e-4, rank 4 on K/V, rollout guidance 3).
"""

from .base import MethodSpec

STAGE_A = {"token_selection": "surrounding", "templates": None, "lambda_reg": 0.1, "lambda_preserve": 1.0,
           "preserve_corpus": "builtin"}
STAGE_B = {"window": "two", "early_mode": "keep", "tau": 0.5, "eta": 1.0, "beta": 0.5, "gamma": 0.5,
           "lora_targets": "kv", "rank": 4, "lr": 1e-4, "steps": 1000, "rollout_guidance": 3.0}

# per model kind, each chosen on that kind's development halves (docs/benchmarks/stage-b-reference.md,
# docs/benchmarks/rece-rounds.md). Stage B's LATE target reverses the original model's concept direction relative to
# the anchor, from the stage-A prediction (so it cannot push back past the anchor), by the rule in
# benchmarks/reference_choice.sh: at full strength for rectified flow, at half (eta 0.5) for latent diffusion, where
# the full push already erased everything and cost retention. Rectified flow also runs two RECE-style rounds of
# stage A (they erase the synonyms stage A leaves on FLUX).
STAGE_A_BY_KIND = {"flow": {"rece_rounds": 2}}
KIND_DEFAULTS = {"flow": {**STAGE_A_BY_KIND["flow"], "reference": "anchor"},
                 "ddpm": {"reference": "anchor", "eta": 0.5}}

TRACE_CLOSED_FORM = MethodSpec(
    name="trace-closed-form",
    engine="closed_form",
    summary="TRACE stage A: closed-form K/V refinement on the concept and surrounding tokens of ~30 prompts",
    defaults=STAGE_A,
    kind_defaults=STAGE_A_BY_KIND,
)

TRACE = MethodSpec(
    name="trace",
    engine="both",
    summary="TRACE: stage A, then a LoRA that reverses guidance only in LATE steps and keeps EARLY steps",
    defaults=STAGE_A,
    trajectory=STAGE_B,
    multi_default="fuse",
    kind_defaults=KIND_DEFAULTS,
)

TRACE_STAGE_B = MethodSpec(
    name="trace-stage-b",
    engine="trajectory",
    summary="TRACE stage B alone (no stage A): an ablation, the LATE-reversal LoRA on the original model",
    trajectory=STAGE_B,
    multi_default="fuse",
)

TRACE_LATE_ONLY = MethodSpec(
    name="trace-late-only",
    engine="both",
    summary="TRACE with stage B trained only on LATE states",
    defaults=STAGE_A,
    trajectory={**STAGE_B, "window": "late"},
    multi_default="fuse",
    kind_defaults=KIND_DEFAULTS,  # an ablation of trace's window: every other default as trace's
)
