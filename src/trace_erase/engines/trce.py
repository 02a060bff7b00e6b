"""TRCE's stage-2 terms (Chen et al., ICCV 2025, arXiv 2503.07389) for the trajectory engine; on when
``TrajectoryConfig.trce`` is set, in place of the engine's own losses.

On a state x_t of the reference model's trajectory under a concept prompt c, taken in the sampling window (TRCE's:
the early, high-noise steps), the original model θ0 gives the two reference predictions

    prefer = ε0(s) + g·(ε0(s) − ε0(∅)),    reject = ε0(c) + g·(ε0(c) − ε0(∅)),

s being the safe wording of the same prompt. The trained model's prediction for c, and for the empty prompt, is held
by the hinge h(ε) = max(0, β·(‖ε − prefer‖² − ‖ε − reject‖² + margin)) (squared distances as means over elements):
zero once ε is nearer prefer than reject by the margin, and otherwise its gradient moves ε towards prefer and away
from reject. Preservation: on states of unconditional trajectories, at any step, ‖ε_θ(∅) − ε*(∅)‖² against the
stage-A model θ*. The loss is (h(ε_θ(c)) + h(ε_θ(∅)))/2 + preserve_scale · L_pres.

Ours (docs/methods.md lists each): the safe wording is the concept's anchor in the same template; the states are the
replay pool's, sampler-exact (the input the denoiser saw, at its own time), and the unconditional trajectories share
the pool with the concept's, refreshed with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import Concept
from ..errors import TraceEraseError
from ..models.base import Conditioning
from .pool import Pool

if TYPE_CHECKING:
    from .protocol import StageBEngine
    from .trajectory_config import TrceConfig

UNCOND = ""  # the prompt of the pool's unconditional trajectories (never a training prompt: concepts are not empty)


def safe_prompts(concepts: list[Concept], templates: list[str]) -> dict[str, str]:
    """Each training prompt → its safe wording: the same template around the concept's anchor."""
    return {t.format(c.name): t.format(c.anchor) for c in concepts for t in templates}


def term_weights(trce: TrceConfig) -> dict[str, float]:
    """Each TRCE term's weight in the total (the two hinges averaged, preservation × ``preserve_scale``)."""
    return {"hinge": 0.5, "hinge_uncond": 0.5, "trce_pres": trce.preserve_scale}


def hinge(pred: torch.Tensor, prefer: torch.Tensor, reject: torch.Tensor, beta: float,
          margin: float) -> torch.Tensor:
    """Per sample: max(0, β·(mean (pred − prefer)² − mean (pred − reject)² + margin))."""
    d_prefer = (pred.float() - prefer.float()).pow(2).flatten(1).mean(1)
    d_reject = (pred.float() - reject.float()).pow(2).flatten(1).mean(1)
    return torch.relu(beta * (d_prefer - d_reject + margin))


def references(engine: StageBEngine, x: torch.Tensor, t: torch.Tensor, prompts: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefer, reject) at the states ``x`` from the original model θ0, for the concept prompts ``prompts``."""
    g = engine.config.trce.guidance
    safe = safe_prompts(engine.concepts, engine.config.training_templates)
    missing = [p for p in prompts if p not in safe]
    if missing:
        raise TraceEraseError(f"the training prompt '{missing[0]}' names no concept being erased; rerun with "
                              "--overwrite")
    conds = Conditioning.cat([engine.cond(prompts), engine.cond([safe[p] for p in prompts]),
                              engine.cond([UNCOND] * len(prompts))])
    with torch.no_grad(), engine.original():
        r_c, r_s, r_u = (r.float() for r in engine.adapter.predict(x.repeat(3, 1, 1, 1), t.repeat(3), conds).chunk(3))
    # in float32: in bf16 each step of the ×15 extrapolation rounds by more than the hinge's margin resolves
    return r_s + g * (r_s - r_u), r_c + g * (r_c - r_u)


def trce_terms(engine: StageBEngine, pool: Pool, backward_scale: float | None = None) -> dict[str, torch.Tensor]:
    """TRCE's terms on a batch of the pool (``hinge``, ``hinge_uncond``, ``trce_pres``) and their weighted
    ``total``; with ``backward_scale`` the gradients of ``backward_scale · total`` are accumulated (branch by branch
    when ``branches="sequential"``) and the terms come back detached."""
    cfg, adapter = engine.config, engine.adapter
    tc = cfg.trce
    concept_rows = [j for j, p in enumerate(pool.prompts) if p != UNCOND]
    uncond_rows = [j for j, p in enumerate(pool.prompts) if p == UNCOND]
    if not concept_rows or not uncond_rows:
        raise TraceEraseError("TRCE needs concept and unconditional trajectories in the replay pool (an older "
                              "checkpoint?); rerun with --overwrite")
    x, t, prompts = engine.sample(pool, concept_rows)
    prefer, reject = references(engine, x, t, prompts)
    xp, tp, _ = engine.sample(pool, uncond_rows, any_time=True, n=tc.preserve_batch)
    u, up = engine.cond([UNCOND] * x.shape[0]), engine.cond([UNCOND] * xp.shape[0])
    with torch.no_grad(), engine.stage_a_model():
        kept = adapter.predict(xp, tp, up)
    branches = {"hinge": (x, t, engine.cond(prompts)), "hinge_uncond": (x, t, u), "trce_pres": (xp, tp, up)}
    weights = term_weights(tc)

    def term(name: str, pred: torch.Tensor) -> torch.Tensor:
        if name == "trce_pres":
            return (pred.float() - kept.float()).pow(2).mean()
        return hinge(pred, prefer, reject, tc.beta, tc.margin).mean()

    terms: dict[str, torch.Tensor] = {}
    if cfg.branches == "batched" or backward_scale is None:
        xs, ts, conds = zip(*branches.values(), strict=True)
        preds = adapter.predict(torch.cat(xs), torch.cat(ts), Conditioning.cat(list(conds)))
        for name, pred in zip(branches, preds.split([len(b[0]) for b in branches.values()]), strict=True):
            terms[name] = term(name, pred)
        terms["total"] = sum(weights[k] * terms[k] for k in weights)
        if backward_scale is not None:
            engine.backward(backward_scale * terms["total"])
            terms = {k: v.detach() for k, v in terms.items()}
        return terms
    for name, (xb, tb, cb) in branches.items():  # one branch's activations alive at a time
        value = term(name, adapter.predict(xb, tb, cb))
        engine.backward(backward_scale * weights[name] * value)
        terms[name] = value.detach()
    terms["total"] = sum(weights[k] * terms[k] for k in weights)
    return terms
