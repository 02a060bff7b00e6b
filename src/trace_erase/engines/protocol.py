"""What the stage-B add-ons (the adversarial defence, the bank branch, EraseAnything's and TRCE's terms) may use of
the trajectory engine.

They receive the engine as a :class:`StageBEngine`: its public surface, no private state, so they do not import the
engine module and the engine can import them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..config import Concept
    from ..models.base import Conditioning, FamilyAdapter
    from .pool import Pool


class StageBEngine(Protocol):
    """The trajectory engine as its add-ons see it."""

    adapter: FamilyAdapter
    config: Any  # TrajectoryConfig
    gen: torch.Generator
    concepts: list[Concept]  # what is being erased

    def cond(self, prompts: list[str]) -> Conditioning:
        """The (cached) conditioning of ``prompts``."""

    def sample(self, pool: Pool, rows: list[int] | None = None, any_time: bool = False,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A training batch of (x_t, t, prompt) from the pool (``n`` states; None: the batch size)."""

    def rollout(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A trajectory of the reference model under ``prompt``: states, model times, final latents."""

    def original(self) -> AbstractContextManager[None]:
        """Context in which the denoiser is the original model θ0."""

    def stage_a_model(self) -> AbstractContextManager[None]:
        """Context in which the denoiser is the stage-A model θ* (the LoRA disabled)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (loss-scaled under fp16)."""
