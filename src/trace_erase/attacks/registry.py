"""The attack registry: each attack's name → the function that runs it, and what it needs from the base model first.

Every attack takes the model as it is now (erased, or the base for the control run) and hands a
:class:`~.optimisers.Candidate` to ``report(budget, candidate)`` at each budget point; the runner generates and
scores it.
"""

from __future__ import annotations

from typing import Any

from ..errors import TraceEraseError
from ..models import ModelHandle
from ..runtime import training_attention
from .config import AttackConfig
from .continuous import concept_vector, inversion, paraphrase, soft_prompt, unlearndiff
from .discrete import p4d, ring_a_bell, ring_a_bell_search
from .optimisers import Report
from .prompts import eval_prompts
from .reference import base_reference

# attacks that optimise against the base model's trajectories: fn(handle, cfg, concept, ref, report, progress)
OPTIMISING = {"soft-prompt": soft_prompt, "inversion": inversion, "unlearndiff": unlearndiff, "p4d": p4d}


def prepare(handle: ModelHandle, cfg: AttackConfig, concept: str, label: str, progress: bool = True) -> Any:
    """What ``cfg.attack`` computes on the base model before any erasure is applied, once for both models: the base
    model's trajectories (the optimising attacks), Ring-A-Bell's searched prompts (text encoders only), or None."""
    if cfg.kind.needs_reference:
        return base_reference(handle, eval_prompts(label), cfg.trajectories, cfg.seed)
    if cfg.attack == "ring-a-bell":
        return ring_a_bell_search(handle, cfg, concept, progress)
    return None


def run_method(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Any,
               families: dict[str, list[str]] | None, report: Report, progress: bool = True) -> None:
    """Dispatch ``cfg.attack`` against the model as it is now; ``ref`` is what the attack took from the base model
    before the erasure was applied (:class:`Reference` trajectories; ring-a-bell: its searched prompts)."""
    with training_attention(handle.adapter.device):  # the attacks backpropagate through attention
        _dispatch(handle, cfg, concept, ref, families, report, progress)


def _dispatch(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Any,
              families: dict[str, list[str]] | None, report: Report, progress: bool) -> None:
    if cfg.attack == "paraphrase":
        return paraphrase(handle, cfg, concept, families or {}, report)
    if cfg.attack == "concept-vector":
        return concept_vector(handle, cfg, concept, report)
    if ref is None:
        raise TraceEraseError(f"the {cfg.attack} attack needs what it computes on the base model first")
    if cfg.attack == "ring-a-bell":
        return ring_a_bell(handle, cfg, ref, report)
    return OPTIMISING[cfg.attack](handle, cfg, concept, ref, report, progress)
