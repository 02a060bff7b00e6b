"""Gated adapters (TRACE stage B, reading (c)): a LoRA that acts only in the LATE sampling steps.

The gate is a ``callback_on_step_end`` — the pipeline's own extension point — that sets the gated adapter's weight
for the next step: the erasure scale while the model time is below τ, 0 before. Nothing in the pipeline is patched.
"""

from __future__ import annotations

from typing import Any

import torch


class GateController:
    """Switches a gated LoRA on only for steps whose model time is LATE (< tau × time range)."""

    def __init__(self, pipe: Any, adapter: Any, names: list[str], weights: list[float], gated_index: int,
                 tau: float):
        self.pipe = pipe
        self.adapter = adapter
        self.names = names
        self.weights = weights
        self.gated_index = gated_index
        self.tau = tau
        self.history: list[tuple[float, float]] = []  # (model time, gated weight) per step, for inspection

    def weight_for(self, scheduler_t: torch.Tensor | float) -> float:
        t = torch.as_tensor(scheduler_t, dtype=torch.float32).reshape(1)
        late = bool(self.adapter.is_late(self.adapter.model_time(t), self.tau)[0])
        return self.weights[self.gated_index] if late else 0.0

    def _set(self, scheduler_t: torch.Tensor | float) -> None:
        w = list(self.weights)
        w[self.gated_index] = self.weight_for(scheduler_t)
        self.pipe.set_adapters(self.names, adapter_weights=w)
        t = float(self.adapter.model_time(torch.as_tensor(scheduler_t, dtype=torch.float32)))
        self.history.append((t, w[self.gated_index]))

    def prepare(self, num_inference_steps: int) -> None:
        """Set the weight for the first step of a ``num_inference_steps`` sampling run (call before the pipeline)."""
        self.history = []
        first = self.adapter.rollout_scheduler(num_inference_steps).timesteps[0]
        self._set(first)

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps):
            self._set(timesteps[i + 1])
        return callback_kwargs
