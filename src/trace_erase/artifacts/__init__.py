"""Erasure artifacts: a standard diffusers LoRA file plus an ``erasure.json`` manifest."""

from .erasure import LORA_WEIGHT_NAME, MANIFEST_NAME, Erasure, load_erasure
from .lora import delta_to_lora, lora_to_delta

__all__ = ["LORA_WEIGHT_NAME", "MANIFEST_NAME", "Erasure", "delta_to_lora", "load_erasure", "lora_to_delta"]
