"""Erasure methods, each a small configuration of an engine. ``METHODS`` is the registry the CLI lists."""

from __future__ import annotations

from ..errors import TraceEraseError
from .advunlearn import ADVUNLEARN
from .ant import ANT
from .base import MethodSpec
from .eraseanything import ERASEANYTHING
from .esd import ESD_U, ESD_X
from .mace_cfr import MACE_CFR
from .trace import TRACE, TRACE_CLOSED_FORM, TRACE_LATE_ONLY, TRACE_STAGE_B
from .trce import TRCE
from .uce import UCE

METHODS: dict[str, MethodSpec] = {
    m.name: m for m in (TRACE, TRACE_CLOSED_FORM, TRACE_LATE_ONLY, TRACE_STAGE_B, UCE, MACE_CFR, ESD_X, ESD_U, ANT,
                        ERASEANYTHING, TRCE, ADVUNLEARN)
}


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``, or an error listing the available ones."""
    if name not in METHODS:
        raise TraceEraseError(f"unknown method '{name}'; available: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "MethodSpec", "get_method"]
