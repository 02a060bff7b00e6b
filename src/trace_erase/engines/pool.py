"""The replay pool of the trajectory engine: states along the stage-A model's own sampling trajectories."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TraceEraseError


@dataclass
class Trajectory:
    """One sampled trajectory: the denoiser inputs at each step (for Euler-type schedulers the scaled
    x_t/√(σ²+1) the pipeline feeds, not the scheduler's x_t), their model times, its prompt and final latents."""

    states: torch.Tensor  # [steps, C, H, W]
    times: torch.Tensor  # [steps]
    prompt: str
    final: torch.Tensor | None = None  # [C, H, W]; None in pools saved before finals were kept


@dataclass
class Pool:
    """Replay pool of trajectories, oldest first: :meth:`add`, :meth:`evict_oldest`, :meth:`sample`."""

    trajectories: list[Trajectory] = field(default_factory=list)

    FORMAT = 2  # 1 stored the scheduler's unscaled x_t

    def __len__(self) -> int:
        return len(self.trajectories)

    def add(self, trajectory: Trajectory) -> None:
        self.trajectories.append(trajectory)

    def evict_oldest(self, which: Callable[[Trajectory], bool] | None = None) -> Trajectory:
        """Remove and return the oldest trajectory (of those ``which`` accepts, when given)."""
        index = next((i for i, tr in enumerate(self.trajectories) if which is None or which(tr)), None)
        if index is None:
            raise TraceEraseError("the replay pool holds no trajectory of the kind to replace")
        return self.trajectories.pop(index)

    @property
    def prompts(self) -> list[str]:
        return [tr.prompt for tr in self.trajectories]

    @property
    def finals(self) -> list[torch.Tensor]:
        """The final latents of the trajectories that kept theirs (all of them, in pools written since format 2)."""
        return [tr.final for tr in self.trajectories if tr.final is not None]

    def sample(self, n: int, gen: torch.Generator, rows: list[int] | None = None,
               allowed: Callable[[torch.Tensor], torch.Tensor] | None = None, window: str = "LATE"
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        """``n`` (state, time, prompt) draws: a trajectory (of ``rows`` only, when given), then one of its steps
        (of those where ``allowed(times)`` is True, when given: the ``window`` the error names), both uniform under
        ``gen``."""
        rows = list(range(len(self.trajectories))) if rows is None else rows
        xs, ts, ps = [], [], []
        for _ in range(n):
            tr = self.trajectories[rows[int(torch.randint(0, len(rows), (1,), generator=gen))]]
            steps = torch.arange(len(tr.times))
            if allowed is not None:
                steps = steps[allowed(tr.times)]
                if len(steps) == 0:
                    fix = "raise tau or rollout_steps" if window == "LATE" else "lower tau or raise rollout_steps"
                    raise TraceEraseError(f"no sampler step falls in the {window} window; {fix}")
            k = int(steps[torch.randint(0, len(steps), (1,), generator=gen)])
            xs.append(tr.states[k])
            ts.append(tr.times[k])
            ps.append(tr.prompt)
        return xs, ts, ps

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint form: parallel lists, as format 2 has always stored them."""
        finals = [tr.final for tr in self.trajectories]  # all kept, or (pools of older checkpoints) none
        return {"states": [tr.states for tr in self.trajectories], "times": [tr.times for tr in self.trajectories],
                "prompts": self.prompts, "finals": finals if all(f is not None for f in finals) else [],
                "format": self.FORMAT}

    @staticmethod
    def from_state(d: dict[str, Any]) -> Pool:
        if d.get("format", 1) != Pool.FORMAT:
            raise TraceEraseError("this checkpoint's replay pool was written by an older trace-erase (unscaled "
                                  "states); rerun with --overwrite instead of --resume")
        finals = list(d.get("finals", []))
        finals += [None] * (len(d["states"]) - len(finals))
        return Pool([Trajectory(s, t, p, f) for s, t, p, f in
                     zip(d["states"], d["times"], d["prompts"], finals, strict=True)])
