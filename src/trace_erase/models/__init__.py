"""Model families: loading, and one adapter per family (SD1.x/2.x, SDXL, FLUX, SD3) registered in :mod:`.registry`;
the denoising loop (:mod:`.denoise`) and the text-input injection attacks and defences use (:mod:`.injection`)."""

from .base import Conditioning, FamilyAdapter, TextStream, TokenLayout
from .flux import FluxAdapter
from .loading import ModelHandle, get_adapter, load_model, load_pipeline, resolve_model
from .registry import ADAPTERS, FAMILIES, adapter_class
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import StableDiffusionXLAdapter

__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "SD3Adapter",
    "adapter_class",
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
