"""What a method is: a name, the engine it configures, and that engine's option overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """A registered erasure method: a small configuration of one (or both) engines."""

    name: str
    engine: str  # "closed_form" (stage A) — the trajectory engine joins in the stage-B issue
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = ("sd", "sdxl", "flux")
