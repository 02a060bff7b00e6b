"""AdvUnlearn (Zhang et al., NeurIPS 2024, arXiv 2405.15234) on the trajectory engine: a LoRA on the CLIP text
encoders, trained with ESD's loss against an inner soft-prompt attack, plus a utility term on retain captions.

Each step, on a state x_t of the original model's trajectory of the concept prompt c:

    L = ‖ε(x_t, t, E_θ(c′)) − [ε0(∅) − η(ε0(c) − ε0(∅))]‖² + w · ‖ε(x_r, t_r, E_θ(r)) − ε0(x_r, t_r, E0(r))‖²

E_θ is the text encoder being trained and E0 the original one; the denoiser ε is never trained, so ε0 is it under
E0. c′ is c for the first ``warmup`` steps, then c with the k adversarial word embeddings of the inner attack in front
(engines/adversarial.py: they minimise ‖ε(E_θ(slots + c)) − ε0(E0(c))‖², the model as it is now regenerating the
concept). r are ``retain_batch`` retain captions, x_r states of their own trajectories of the original model, and
w = ``retain_weight``. The erase target is ESD's (:func:`~.trajectory.reversed_guidance`).

Choices that are ours (docs/methods.md lists them with AdvUnlearn's code's settings): the LoRA (AdvUnlearn trains
the encoder's full weights), states from the replay pool (its code samples a fresh partial trajectory per step),
retain trajectories of our caption corpus kept in the pool, and the attack's steps on pool states.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Concept
from ..models.base import Conditioning
from ..models.text_lora import live_name, split_qualified, text_lora_targets
from .pool import Pool, Trajectory
from .prompts import load_corpus
from .trajectory import TrajectoryEngine, reversed_guidance


class TextEncoderEngine(TrajectoryEngine):
    """The trajectory engine with its LoRA on the pipeline's CLIP text encoders and AdvUnlearn's loss
    (``config.advunlearn``); the denoiser's weights are never touched."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.retain: list[str] = []  # the retain captions (set by :meth:`train`)
        self._retain_set: set[str] = set()
        self._pool, self._step = Pool(), 0  # the pool and step the current training step reads

    def _targets(self) -> list[str]:
        """The qualified names (``text_encoder.text_model.…``) of every CLIP encoder's layers the preset covers."""
        found = text_lora_targets(self.adapter.pipe, self.config.lora_targets)
        return [f"{component}.{name}" for component, names in found.items() for name in names]

    def lora_hosts(self) -> dict[str, tuple[torch.nn.Module, list[str]]]:
        hosts: dict[str, tuple[torch.nn.Module, list[str]]] = {}
        for name in self.targets:
            component, canonical = split_qualified(name)
            encoder = getattr(self.adapter.pipe, component)
            hosts.setdefault(component, (encoder, []))[1].append(live_name(encoder, canonical))
        return hosts

    def trained_layer(self, name: str) -> torch.nn.Module:
        component, canonical = split_qualified(name)
        encoder = getattr(self.adapter.pipe, component)
        return encoder.get_submodule(live_name(encoder, canonical))

    # ---- conditioning, pool -------------------------------------------------------------------------------------
    def cond(self, prompts: list[str]) -> Conditioning:
        """The original text encoders' conditioning of ``prompts`` (cached): the targets' and the rollouts'."""
        with self.original():
            return super().cond(prompts)

    def _is_retain(self, trajectory: Trajectory) -> bool:
        return trajectory.prompt in self._retain_set

    def fill_pool(self, pool: Pool, concepts: list[Concept]) -> None:
        """Roll out the original model's trajectories until the pool holds ``pool_trajectories`` of the concepts and
        ``retain_trajectories`` of retain captions (drawn at random)."""
        cfg = self.config
        while sum(not self._is_retain(tr) for tr in pool.trajectories) < cfg.pool_trajectories:
            prompt = self._target_prompt(concepts)
            s, t, final = self.rollout(prompt)
            pool.add(Trajectory(s, t, prompt, final[0].detach().cpu()))
        while self.retain and sum(map(self._is_retain, pool.trajectories)) < cfg.advunlearn.retain_trajectories:
            prompt = self.retain[int(torch.randint(0, len(self.retain), (1,), generator=self.gen))]
            s, t, final = self.rollout(prompt)
            pool.add(Trajectory(s, t, prompt, final[0].detach().cpu()))

    def refresh(self, pool: Pool, concepts: list[Concept]) -> None:
        """Replace the oldest concept trajectory and the oldest retain one."""
        pool.evict_oldest(lambda tr: not self._is_retain(tr))
        if self.retain:
            pool.evict_oldest(self._is_retain)
        self.fill_pool(pool, concepts)

    def _rows(self, pool: Pool, retain: bool) -> list[int]:
        return [i for i, tr in enumerate(pool.trajectories) if self._is_retain(tr) == retain]

    def sample(self, pool: Pool, rows: list[int] | None = None, any_time: bool = False,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """As the engine's, from the concept trajectories unless ``rows`` says otherwise."""
        return super().sample(pool, self._rows(pool, False) if rows is None else rows, any_time, n)

    # ---- training -----------------------------------------------------------------------------------------------
    def train(self, concepts: list[Concept]) -> dict[str, Any]:
        """Train the text-encoder LoRA (see the module docstring); returns its tensors and a log."""
        au = self.config.advunlearn
        own = [p for c in concepts for p in c.preserve]
        self.retain = list(dict.fromkeys(own + load_corpus(self.adapter, au.retain_corpus, concepts)))
        self._retain_set = set(self.retain)
        self._pool, self._step = Pool(), 0
        return super().train(concepts)

    def before_step(self, pool: Pool, concepts: list[Concept], step: int) -> None:
        """The pool's refresh; from step ``warmup`` on, the inner attack every ``adversarial_every`` steps."""
        cfg = self.config
        self._pool, self._step = pool, step
        if step > 0 and step % cfg.refresh_every == 0:
            self.refresh(pool, concepts)
        if self.adversarial_phase and (step - cfg.advunlearn.warmup) % cfg.adversarial.every == 0:
            self.adversarial.attack(pool)

    @property
    def adversarial_phase(self) -> bool:
        """Whether this step trains on the adversarial prompt (after the warmup, with the attack on)."""
        return self.adversarial is not None and self._step >= self.config.advunlearn.warmup

    def loss_terms(self, x: torch.Tensor, t: torch.Tensor, prompts: list[str], preserve: list[str],
                   backward_scale: float | None = None) -> dict[str, torch.Tensor]:
        """The erase term on (x, t, prompts), the retain term on a batch of retain states, and the weighted total;
        with ``backward_scale`` each term's gradients are accumulated as it is computed (one branch alive)."""
        cfg, adapter = self.config, self.adapter
        au = cfg.advunlearn
        n = x.shape[0]
        with torch.no_grad():  # the original model: the denoiser is untouched, the conditioning is E0's
            e_c, e_u = adapter.predict(x.repeat(2, 1, 1, 1), t.repeat(2),
                                       Conditioning.cat([self.cond(prompts), self.cond([""] * n)])).chunk(2)
        target = reversed_guidance(e_u, e_c, e_u, cfg.eta)
        per = lambda a, b: (a.float() - b.float()).pow(2).flatten(1).mean(1)  # noqa: E731
        with adapter.text_gradients():
            trained = self.adversarial.encode(prompts) if self.adversarial_phase else adapter.conditioning(prompts)
        erase = per(adapter.predict(x, t, trained), target).mean()
        if backward_scale is not None:
            self.backward(backward_scale * erase)
            erase = erase.detach()
        retain = torch.zeros((), device=x.device)
        rows = self._rows(self._pool, True)
        if au.retain_weight > 0 and rows:
            xr, tr, rp = super().sample(self._pool, rows, n=au.retain_batch)
            with torch.no_grad():
                kept = adapter.predict(xr, tr, self.cond(rp))
            with adapter.text_gradients():
                cr = adapter.conditioning(rp)
            retain = per(adapter.predict(xr, tr, cr), kept).mean()
            if backward_scale is not None:
                self.backward(backward_scale * au.retain_weight * retain)
                retain = retain.detach()
        adv = erase if self.adversarial_phase else torch.zeros_like(erase)
        return {"erase": erase, "retain": retain, "adv": adv, "total": erase + au.retain_weight * retain}

    def term_weights(self) -> dict[str, float]:
        return {"erase": 1.0, "retain": self.config.advunlearn.retain_weight}
