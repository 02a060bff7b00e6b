"""What a method is: a name, the engine it configures, and that engine's option overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import TraceEraseError
from ..models.registry import FAMILIES, adapter_class


@dataclass(frozen=True)
class MethodSpec:
    """A registered erasure method: a small configuration of one (or both) engines."""

    name: str
    engine: str  # "closed_form" (stage A), "trajectory" (stage B) or "both" (stage A, then stage B on top)
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)  # closed-form engine options
    trajectory: dict[str, Any] = field(default_factory=dict)  # trajectory engine options
    families: tuple[str, ...] = FAMILIES  # every registered model family unless a method says otherwise
    # several concepts with stage B: "fuse" (per-concept LoRAs + closed-form integration: TRACE's and ANT's
    # multi-concept recipes) or "joint" (one LoRA, a concept sampled per step: ESD's)
    multi_default: str = "joint"
    # trajectory options that replace ``trajectory``'s when several concepts are erased (a method's own
    # multi-concept settings, e.g. ANT's earlier cut-off); an explicit option still wins
    multi_trajectory: dict[str, Any] = field(default_factory=dict)
    family_reason: str = ""  # why the families left out are (said when one is refused)
    # option overrides per model kind — "ddpm" (latent diffusion: SD 1.x/2.x/XL) or "flow" (rectified flow: FLUX,
    # SD3) — each chosen on that kind's development half; they sit over the method's defaults and under the user's
    # options, and each key goes to the engine that owns it
    kind_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check_family(self, family: str | None) -> None:
        """Refuse a model family this method does not support (None: not known yet, nothing to check)."""
        if family is not None and family not in self.families:
            why = f" ({self.family_reason})" if self.family_reason else ""
            raise TraceEraseError(f"method '{self.name}' does not support {family}{why}; it supports "
                                  f"{', '.join(self.families)} — pick another --method or model")

    def kind_options(self, family: str | None) -> dict[str, Any]:
        """This method's overrides for ``family``'s model kind (none when the family is not known yet)."""
        if family is None or not self.kind_defaults:
            return {}
        return dict(self.kind_defaults.get(adapter_class(family).time_kind, {}))

    @property
    def uses_closed_form(self) -> bool:
        return self.engine in ("closed_form", "both")

    @property
    def uses_trajectory(self) -> bool:
        return self.engine in ("trajectory", "both")
