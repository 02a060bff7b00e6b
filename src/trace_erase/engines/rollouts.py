"""The trajectory engine's conditioning and replay pool: prompts encoded once, trajectories of the reference model
rolled out exactly as the pipeline samples, and training states drawn from them (a mixin of
:class:`~trace_erase.engines.trajectory.TrajectoryEngine`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..config import Concept
from ..models.base import Conditioning
from ..models.denoise import denoise
from .pool import Pool, Trajectory
from .trce import UNCOND
from .windows import balanced_draws


class RolloutMixin:
    """Conditioning cache, rollouts and the replay pool of the trajectory engine."""

    adapter: Any
    config: Any
    gen: torch.Generator
    _cond_cache: dict[str, Conditioning]
    reference: Callable[[], AbstractContextManager[None]]  # the rollouts' model (LoraSwitchMixin)

    def cond(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts``, each encoded once (no gradients) and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            with torch.no_grad():
                c = self.adapter.conditioning(missing)
            for i, p in enumerate(missing):
                self._cond_cache[p] = c.select([i])
        return Conditioning.cat([self._cond_cache[p] for p in prompts])

    def rollout(self, prompt: str, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        """A trajectory of θ* under ``prompt`` exactly as the pipeline's own ``__call__`` samples it (same scheduler,
        input scaling, guidance semantics, ``rollout_guidance``): the denoiser's input at each step, its model time,
        and the final latents. ``noise`` is the standard-normal x_T before ``init_noise_sigma`` (default: drawn from
        the engine's generator)."""
        cfg, adapter = self.config, self.adapter
        scheduler = adapter.rollout_scheduler(cfg.rollout_steps)
        if noise is None:
            noise = torch.randn(adapter.latent_shape(1), generator=self.gen)
        x = adapter.initial_noise(scheduler, noise)
        c, u = self.cond([prompt] * x.shape[0]), self.cond([""] * x.shape[0])
        states, times = [], []

        def keep(x_in: torch.Tensor, tm: torch.Tensor) -> None:  # what the denoiser sees: the pool stores exactly this
            states.append(x_in[0].detach().cpu())
            times.append(tm[0].detach().cpu().float())

        with self.reference():
            x = denoise(adapter, scheduler, x, c, u, cfg.rollout_guidance, self.gen, keep)
        return torch.stack(states), torch.stack(times), x

    def _target_prompt(self, concepts: list[Concept]) -> str:
        templates = self.config.training_templates
        i = int(torch.randint(0, len(concepts) * len(templates), (1,), generator=self.gen))
        return templates[i % len(templates)].format(concepts[i // len(templates)].name)

    def fill_pool(self, pool: Pool, concepts: list[Concept]) -> None:
        """Roll out trajectories until the pool holds ``pool_trajectories`` of the concepts (and, with TRCE's terms,
        ``trce_preserve_trajectories`` unconditional ones)."""
        cfg = self.config
        while sum(p != UNCOND for p in pool.prompts) < cfg.pool_trajectories:
            prompt = self._target_prompt(concepts)
            s, t, final = self.rollout(prompt)
            pool.add(Trajectory(s, t, prompt, final[0].detach().cpu()))
        while cfg.trce is not None and pool.prompts.count(UNCOND) < cfg.trce.preserve_trajectories:
            s, t, final = self.rollout(UNCOND)
            pool.add(Trajectory(s, t, UNCOND, final[0].detach().cpu()))

    def refresh(self, pool: Pool, concepts: list[Concept]) -> None:
        """Replace the oldest trajectory (of each kind: concept, unconditional) with a fresh one."""
        pool.evict_oldest(lambda tr: tr.prompt != UNCOND)
        if self.config.trce is not None:
            pool.evict_oldest(lambda tr: tr.prompt == UNCOND)
        self.fill_pool(pool, concepts)

    def sample(self, pool: Pool, rows: list[int] | None = None, any_time: bool = False,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A batch of ``n`` (default ``batch_size``) (x_t, t, prompt) from the pool (from trajectories ``rows`` only,
        when given); with window='late' only LATE states, with window='early' only EARLY ones, with
        window_sampling='balanced' half from each window, unless ``any_time``."""
        cfg = self.config
        if cfg.window_sampling == "balanced" and cfg.window == "two" and not any_time:
            xs, ts, ps = balanced_draws(pool, n or cfg.batch_size, self.gen, self.adapter, cfg.tau, cfg.keep_end, rows)
            return (torch.stack(xs).to(self.adapter.device, self.adapter.dtype),
                    torch.stack(ts).to(self.adapter.device), ps)
        window = cfg.window if cfg.window in ("late", "early") and not any_time else None
        allowed = (lambda times: self.adapter.is_late(times, cfg.tau) == (window == "late")) if window else None
        xs, ts, ps = pool.sample(n or cfg.batch_size, self.gen, rows, allowed, (window or "late").upper())
        return (torch.stack(xs).to(self.adapter.device, self.adapter.dtype),
                torch.stack(ts).to(self.adapter.device), ps)
