"""Stage A's ΔW held beside the base weights while stage B trains, switchable in place of a copy of the model.

Each edited layer keeps two weight tensors — the base one and base + ΔW — and :meth:`StageAWeights.set` points the
layer's parameter at one or the other. Switching costs nothing, never rounds (a half-precision add-then-subtract
would drift), and the base tensor is put back untouched at the end. Stage B's θ* (stage A on) and θ0 (stage A off,
``reference="original"``) are then the same network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..models.base import FamilyAdapter


class StageAWeights:
    """The stage-A edit of ``adapter``'s layers, off until :meth:`applied` (or :meth:`set`)."""

    def __init__(self, adapter: FamilyAdapter, deltas: dict[str, torch.Tensor]):
        self.params = {name: adapter.module(name).weight for name in deltas}
        self.base = {name: p.data for name, p in self.params.items()}
        with torch.no_grad():
            self.edited = {name: (p.data.float() + deltas[name].to(p.device).float()).to(p.dtype)
                           for name, p in self.params.items()}
        self.on = False

    def set(self, on: bool) -> None:
        """Point every edited layer at base + ΔW (``on``) or at the base weights."""
        for name, p in self.params.items():
            p.data = self.edited[name] if on else self.base[name]
        self.on = on

    @contextlib.contextmanager
    def applied(self) -> Iterator[StageAWeights]:
        """Stage A on for the duration; the base tensors are back in place after, whatever happens."""
        self.set(True)
        try:
            yield self
        finally:
            self.set(False)
