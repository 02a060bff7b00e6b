"""The replay pool of the trajectory engine: states along the frozen model's own sampling trajectories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TraceEraseError


@dataclass
class Pool:
    """Replay pool: the denoiser inputs (and their model times) along trajectories of the frozen model — for
    Euler-type schedulers the scaled x_t/√(σ²+1) the pipeline feeds, not the scheduler's x_t."""

    states: list[torch.Tensor] = field(default_factory=list)  # one [steps, C, H, W] tensor per trajectory
    times: list[torch.Tensor] = field(default_factory=list)  # one [steps] tensor per trajectory
    prompts: list[str] = field(default_factory=list)
    finals: list[torch.Tensor] = field(default_factory=list)  # each trajectory's final latents (its image)

    FORMAT = 2  # 1 stored the scheduler's unscaled x_t

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states, "times": self.times, "prompts": self.prompts, "finals": self.finals,
                "format": self.FORMAT}

    @staticmethod
    def from_state(d: dict[str, Any]) -> Pool:
        if d.get("format", 1) != Pool.FORMAT:
            raise TraceEraseError("this checkpoint's replay pool was written by an older trace-erase (unscaled "
                                  "states); rerun with --overwrite instead of --resume")
        return Pool(list(d["states"]), list(d["times"]), list(d["prompts"]), list(d.get("finals", [])))
