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
    prompt (encoded once per refresh)."""

    def __init__(self, engine: StageBEngine, concepts: list[Concept]):
        self.engine = engine
        cfg = engine.config
        self.prompts = {t.format(c.name): c.name for c in concepts for t in cfg.train_templates}
        self.slots = WordSlots(engine.adapter, cfg.adversarial.tokens, list(self.prompts))
        device = engine.adapter.device
        self.values = {c.name: [v.to(device) for v in self.slots.init_from(self.slots.filler)] for c in concepts}
        self.losses: dict[str, float] = {}
        self._cond: dict[str, Conditioning] = {}

    def attack(self, pool: Pool) -> None:
        """Update every concept's slots by ``adversarial_steps`` Adam steps against the model as it is now."""
        engine, adapter, cfg = self.engine, self.engine.adapter, self.engine.config
        with no_param_grads([adapter.denoiser, *(enc for _, enc in adapter.text_encoders())]):
            for name, values in self.values.items():
                rows = [j for j, p in enumerate(pool.prompts) if self.prompts.get(p) == name]
                if not rows:
                    continue
                live = [v.detach().clone().requires_grad_(True) for v in values]
                opt = torch.optim.Adam(self.slots.param_groups(live, cfg.adversarial.lr))
                for step in range(cfg.adversarial.steps):
                    x, t, prompts = engine.sample(pool, rows, any_time=True)
                    with torch.no_grad(), engine.original():
                        target = adapter.predict(x, t, engine.cond(prompts))
                    with self.slots.active(live), adapter.text_gradients():
                        cond = adapter.conditioning([self.slots.prefixed(p) for p in prompts])
                    loss = torch.nn.functional.mse_loss(adapter.predict(x, t, cond).float(), target.float())
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"the adversarial prompt's loss became {loss.item()} at inner step "
                                                 f"{step}; lower adversarial_lr")
                    # only the slots' gradients: the adapter toggles in ``original()`` mark the LoRA trainable again
                    for v, g in zip(live, torch.autograd.grad(loss, live), strict=True):
                        v.grad = g
                    if not finite_gradients(live):
                        raise NonFiniteLossError(
                            f"the adversarial prompt's gradients became non-finite at inner step {step} with a finite "
                            "loss; on CUDA rerun with --option attention_kernels=math and --resume (elsewhere: lower "
                            "adversarial_lr)")
                    opt.step()
                self.values[name] = [v.detach() for v in live]
                self.losses[name] = float(loss.detach())
        self._encode()

    def _encode(self) -> None:
        """Each training prompt's adversarial conditioning under its concept's current slots."""
        adapter = self.engine.adapter
        self._cond = {}
        for name, values in self.values.items():
            prompts = [p for p, c in self.prompts.items() if c == name]
            with torch.no_grad(), self.slots.active(values):
                cond = adapter.conditioning([self.slots.prefixed(p) for p in prompts])
            self._cond.update({p: cond.select([i]) for i, p in enumerate(prompts)})

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
