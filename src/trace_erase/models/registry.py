"""The model families: one adapter class per family, registered here. Everything family-specific — sampler defaults,
batch sizing, export names, time kind, how a pipeline is recognised — is an attribute of the adapter class, so adding
a family is one adapter file plus one line in :data:`ADAPTERS` (the first adapter whose ``matches`` accepts a
pipeline is used; the ``matches`` of related families exclude each other, as SD's excludes SDXL's text-time
embedding, or the more specific family goes first)."""

from __future__ import annotations

from ..errors import TraceEraseError
from .base import FamilyAdapter
from .flux import FluxAdapter
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import StableDiffusionXLAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (StableDiffusionAdapter, StableDiffusionXLAdapter, FluxAdapter, SD3Adapter)
FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)


def adapter_class(family: str) -> type[FamilyAdapter]:
    """The adapter class of a family name (one line naming the known families otherwise)."""
    for cls in ADAPTERS:
        if cls.family == family:
            return cls
    raise TraceEraseError(f"unknown model family '{family}'; known: {', '.join(FAMILIES)}")


def family_of_pipeline_class(name: str) -> str | None:
    """The family a diffusers pipeline class loads as, or None."""
    return next((cls.family for cls in ADAPTERS if cls.pipeline_class == name), None)


def supported() -> str:
    """The supported families, for error messages."""
    return ", ".join(cls.label for cls in ADAPTERS)
