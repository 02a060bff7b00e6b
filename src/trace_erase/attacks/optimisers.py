"""What every optimising attack shares, discrete or continuous: the candidate it reports, its budget loop, a
checked descent step, AdvUnlearn's / P4D's match-the-base objective and Ring-A-Bell's concept direction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..engines.prompts import DEFAULT_TEMPLATES
from ..errors import NonFiniteLossError
from ..evaluation.suites import fill
from ..models import ModelHandle
from ..models.base import Conditioning
from ..models.injection import WordSlots, editable
from ..runtime import finite_gradients
from .config import AttackConfig
from .prompts import HELD_OUT_TEMPLATES, INVERSION_TEMPLATES
from .reference import Reference


@dataclass
class Candidate:
    """An attack's current result, ready to generate: the prompts the pipeline is called with (they may hold filler
    slots), the text the report shows, and how the attack reaches the model (word slots, or conditioning embeds)."""

    prompts: list[str]
    shown: list[str]
    family: list[str] | None = None
    slots: WordSlots | None = None
    values: list[torch.Tensor | None] | None = None
    embeds: Callable[[list[str]], dict[str, Any]] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Report = Callable[[int, Candidate], None]


def budget_steps(cfg: AttackConfig, progress: bool, desc: str) -> Any:
    """The steps 1..budget of an optimising attack, with a progress bar."""
    return tqdm(range(1, cfg.the_budget + 1), desc=desc, disable=not progress, leave=False)


def check_loss(loss: torch.Tensor, step: int, what: str) -> None:
    """Stop an attack whose loss is not finite, naming the fix."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"the {what} attack's loss became {loss.item()} at step {step}; lower --lr")


def check_gradients(opt: torch.optim.Optimizer, step: int, what: str) -> None:
    """Refuse a step whose gradients are not finite under a finite loss, before it is applied."""
    if not finite_gradients(opt):
        raise NonFiniteLossError(f"the {what} attack's gradients became non-finite at step {step} with a finite loss; "
                                 "on CUDA in bf16 that is an attention kernel's backward: rerun with --dtype fp32 "
                                 "(elsewhere: lower --lr)")


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, what: str) -> None:
    """One optimiser step on a finite loss and finite gradients (otherwise an error naming the fix)."""
    check_loss(loss, step, what)
    opt.zero_grad()
    loss.backward()
    check_gradients(opt, step, what)
    opt.step()


def match_base_loss(handle: ModelHandle, ref: Reference, idx: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """AdvUnlearn's / P4D's objective: the model's prediction on the base model's states ``idx`` under ``cond``
    against the base model's own prediction there for the concept prompt."""
    pred = handle.adapter.predict(ref.states[idx], ref.times[idx], cond)
    return torch.nn.functional.mse_loss(pred.float(), ref.base_pred[idx].float())


def attacked_modules(handle: ModelHandle) -> list[torch.nn.Module]:
    """The networks an attack differentiates through (their own parameters get no gradients)."""
    return [handle.adapter.denoiser, *(enc for _, enc in handle.adapter.text_encoders())]


VECTOR_TEMPLATES = 10  # templates averaged into v when the budget counts something else (ring-a-bell)


def concept_direction(handle: ModelHandle, concept: str, neutral: str, n_templates: int
                      ) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Ring-A-Bell's concept vector v = mean over ``n_templates`` templates of E(with ``concept``) − E(with
    ``neutral``), per text-feature stream (the attack's templates first, then stage A's common ones: the attacker
    does not know which the erasure saw). Returns v, the stream names and how many templates there were."""
    adapter = handle.adapter
    pool = list(dict.fromkeys([*HELD_OUT_TEMPLATES, *INVERSION_TEMPLATES, *(t.replace("{}", "{a} {}")
                                                                              for t in DEFAULT_TEMPLATES)]))
    templates = pool[:n_templates]
    with torch.no_grad():
        with_c = adapter.conditioning([fill(t, concept) for t in templates])
        without = adapter.conditioning([fill(t, neutral) for t in templates])
    keys = editable(with_c)
    v = {k: (with_c.tensors[k].float() - without.tensors[k].float()).mean(0, keepdim=True) for k in keys}
    return v, keys, len(templates)
