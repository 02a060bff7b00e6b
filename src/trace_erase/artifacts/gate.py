"""Gated adapters (TRACE stage B with ``--gate-tau``): a LoRA that acts only in the LATE sampling steps.

The gate is a forward pre-hook on the denoiser — a standard ``torch.nn.Module`` hook, nothing in the pipeline is
patched — that reads the timestep the denoiser is called with and sets the gated adapter's scale before the call:
the erasure scale while the model time is LATE (below τ × the time range), 0 before. Because it sits on the denoiser,
a plain ``pipe(prompt)`` honours it, whatever scheduler or number of steps the call uses.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

HISTORY = 10_000  # denoiser calls the gate remembers


class LateGate:
    """Switches the LoRA adapter ``name`` on (at ``scale``) only for denoiser calls at LATE model times."""

    def __init__(self, adapter: Any, name: str, scale: float, tau: float):
        self.adapter = adapter
        self.name = name
        self.scale = scale
        self.tau = tau
        # (model time, gated scale) of the latest denoiser calls, for inspection; bounded so a long-lived server's
        # pipeline does not grow it forever
        self.history: deque[tuple[float, float]] = deque(maxlen=HISTORY)
        den = adapter.denoiser
        self.layers = [m for m in den.modules() if hasattr(m, "set_scale") and name in getattr(m, "scaling", {})]
        self._handle = den.register_forward_pre_hook(self._before, with_kwargs=True)

    @staticmethod
    def _timestep(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)  # UNet: (sample, timestep, …); FLUX: kwargs
        return None if t is None else torch.as_tensor(t).detach().reshape(-1)[:1].float().cpu()

    def weight_for(self, model_time: torch.Tensor | float) -> float:
        """The gated adapter's scale at ``model_time`` (the denoiser's own time: DDPM t, or flow σ)."""
        t = torch.as_tensor(model_time, dtype=torch.float32).reshape(1)
        return self.scale if bool(self.adapter.is_late(t, self.tau)[0]) else 0.0

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        t = self._timestep(args, kwargs)
        if t is None:
            return
        w = self.weight_for(t)
        for layer in self.layers:
            layer.set_scale(self.name, w)
        self.history.append((float(t[0]), w))

    def remove(self) -> None:
        """Take the hook off the denoiser (the adapter itself is unloaded by the caller)."""
        self._handle.remove()
