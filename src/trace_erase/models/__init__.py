"""Model families: loading and one adapter per family (SD1.x/2.x, SDXL, FLUX)."""

from .base import Conditioning, FamilyAdapter, TextStream, TokenLayout
from .flux import FluxAdapter
from .loading import ModelHandle, get_adapter, load_model, load_pipeline, resolve_model
from .sd import StableDiffusionAdapter
from .sdxl import StableDiffusionXLAdapter

__all__ = [
    "Conditioning",
    "FamilyAdapter",
    "FluxAdapter",
    "ModelHandle",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "TextStream",
    "TokenLayout",
    "get_adapter",
    "load_model",
    "load_pipeline",
    "resolve_model",
]
