"""trace-erase: concept erasure for text-to-image diffusion models (TRACE, UCE, MACE-CFR, ...)."""

from .api import erase
from .artifacts import Erasure, load_erasure
from .config import Concept
from .errors import TraceEraseError
from .methods import METHODS
from .models import get_adapter, load_model, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Concept",
    "Erasure",
    "TraceEraseError",
    "erase",
    "get_adapter",
    "load_erasure",
    "load_model",
    "load_pipeline",
]
