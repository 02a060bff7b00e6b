"""Adversarial prompts inside the trajectory engine: a defence against word-level attacks (ours; the recipe of
AdvUnlearn and Receler, on TRACE's LATE loss).

Every ``adversarial_every`` training steps an inner attack — the harness's ``soft-prompt`` attack at the word level —
optimises k prefix word embeddings per concept so that the model *as it is being trained* (stage A applied, the
LoRA on) predicts, under "<k slots> {prompt}", what the original model θ0 predicts under "{prompt}", on states of the
replay pool. The found conditioning then joins stage B's erase loss as one more branch: in the LATE window (every
window for ESD's ``all``) its prediction is pulled to the same reversed-guidance target as the concept prompt's.
So the erasure is trained against the attacker it will meet, while the EARLY keep term is left as it was.

Choices that are ours: the inner attack is warm-started from its previous result (it tracks the moving model
with a few steps instead of restarting), its states come from the replay pool (the base trajectories the test-time
attack uses, all times), and the slots' values are saved in the checkpoint so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..config import Concept
from ..errors import NonFiniteLossError
from ..models.base import Conditioning
from ..models.injection import WordSlots, no_param_grads
from ..runtime import finite_gradients
from .pool import Pool

if TYPE_CHECKING:
    from .protocol import StageBEngine


class AdversarialPrompts:
    """Per-concept adversarial word slots for the trajectory engine, and the conditioning they give each training
    prompt (encoded once per refresh). ``restart``: each attack starts from k random vocabulary words instead of
    its last result; ``signed``: its Adam steps take the gradient's sign (AdvUnlearn's ``fast_at``)."""

    def __init__(self, engine: StageBEngine, concepts: list[Concept], restart: bool = False, signed: bool = False):
        self.engine = engine
        self.restart, self.signed = restart, signed
        cfg = engine.config
        self.prompts = {t.format(c.name): c.name for c in concepts for t in cfg.training_templates}
        self.slots = WordSlots(engine.adapter, cfg.adversarial.tokens, list(self.prompts))
        device = engine.adapter.device
        self.values = {c.name: [v.to(device) for v in self.slots.init_from(self.slots.filler)] for c in concepts}
        self.losses: dict[str, float] = {}
        self._cond: dict[str, Conditioning] = {}

    def attack_loss(self, values: list[torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    prompts: list[str]) -> torch.Tensor:
        """The inner attack's objective (:func:`match_original_loss`) for the slots ``values`` before each prompt."""
        return match_original_loss(self.engine, self.slots, values, x, t, prompts,
                                   [self.slots.prefixed(p) for p in prompts])

    def attack(self, pool: Pool) -> None:
        """Update every concept's slots by ``adversarial_steps`` Adam steps against the model as it is now."""
        engine, cfg = self.engine, self.engine.config
        for name, values in self.values.items():
            rows = [j for j, p in enumerate(pool.prompts) if self.prompts.get(p) == name]
            if not rows:
                continue
            start = self.slots.init_random(engine.gen) if self.restart else values
            self.values[name], losses = descend_slots(engine, pool, rows, self.slots, start, self.attack_loss,
                                                      cfg.adversarial.steps, cfg.adversarial.lr, "adversarial_lr",
                                                      signed=self.signed)
            self.losses[name] = losses[-1]
        self._encode()

    def _encode(self) -> None:
        """Each training prompt's adversarial conditioning under its concept's current slots."""
        prompts = list(self.prompts)
        with torch.no_grad():
            cond = self.encode(prompts)
        self._cond = {p: cond.select([i]) for i, p in enumerate(prompts)}

    def encode(self, prompts: list[str]) -> Conditioning:
        """The adversarial conditioning of training ``prompts`` under their concepts' current slots, encoded now
        (under ``adapter.text_gradients()`` it carries gradients to trained text-encoder weights)."""
        adapter = self.engine.adapter
        rows: dict[int, Conditioning] = {}
        for name in dict.fromkeys(self.prompts[p] for p in prompts):
            idx = [i for i, p in enumerate(prompts) if self.prompts[p] == name]
            with self.slots.active(self.values[name]):
                cond = adapter.conditioning([self.slots.prefixed(prompts[i]) for i in idx])
            rows.update({i: cond.select([j]) for j, i in enumerate(idx)})
        return Conditioning.cat([rows[i] for i in range(len(prompts))])

    def cond(self, prompts: list[str]) -> Conditioning:
        """The adversarial conditioning of a batch of training prompts (after the first :meth:`attack`)."""
        if not self._cond:
            self._encode()
        return Conditioning.cat([self._cond[p] for p in prompts])

    def state_dict(self) -> dict[str, Any]:
        return {"values": {n: [v.cpu() for v in vs] for n, vs in self.values.items()}, "losses": dict(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.engine.adapter.device
        self.values = {n: [v.to(device) for v in vs] for n, vs in state["values"].items()}
        self.losses = dict(state.get("losses", {}))
        self._cond = {}


def match_original_loss(engine: StageBEngine, slots: WordSlots, values: list[torch.Tensor], x: torch.Tensor,
                        t: torch.Tensor, prompts: list[str], texts: list[str]) -> torch.Tensor:
    """How far the model as it is now, under ``texts`` (carrying the slots, filled with ``values``), is from what
    the original model predicts under ``prompts`` (MSE): the soft-prompt attack's objective, text by text."""
    adapter = engine.adapter
    with torch.no_grad(), engine.original():
        target = adapter.predict(x, t, engine.cond(prompts))
    with slots.active(values), adapter.text_gradients():
        cond = adapter.conditioning(texts)
    return torch.nn.functional.mse_loss(adapter.predict(x, t, cond).float(), target.float())


def descend_slots(engine: StageBEngine, pool: Pool, rows: list[int], slots: WordSlots, start: list[torch.Tensor],
                  loss_at: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
                  steps: int, lr: float, lr_key: str, signed: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """``steps`` Adam steps (lr ``lr`` in the first encoder's units; on the gradient's sign when ``signed``) on slot
    values from ``start``, each on a fresh batch of states, at any time, of the pool's trajectories ``rows``; returns
    the values and each step's loss. Only the slots get gradients; ``lr_key`` is the option a failure names."""
    adapter = engine.adapter
    live = [v.detach().clone().to(adapter.device).requires_grad_(True) for v in start]
    opt = torch.optim.Adam(slots.param_groups(live, lr))
    losses: list[float] = []
    with no_param_grads([adapter.denoiser, *(enc for _, enc in adapter.text_encoders())]):
        for step in range(steps):
            x, t, prompts = engine.sample(pool, rows, any_time=True)
            loss = loss_at(live, x, t, prompts)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the adversarial prompt's loss became {loss.item()} at inner step {step}; "
                                         f"lower {lr_key}")
            # only the slots' gradients: the adapter toggles in ``original()`` mark the LoRA trainable again
            for v, g in zip(live, torch.autograd.grad(loss, live), strict=True):
                v.grad = g.sign() if signed else g
            if not finite_gradients(live):
                raise NonFiniteLossError(
                    f"the adversarial prompt's gradients became non-finite at inner step {step} with a finite loss; "
                    f"on CUDA rerun with --option attention_kernels=math and --resume (elsewhere: lower {lr_key})")
            opt.step()
            losses.append(float(loss.detach()))
    return [v.detach() for v in live], losses
