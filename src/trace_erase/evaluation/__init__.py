"""Evaluation: metric formulas, classifier backends, prompt suites, the eval/demo runners and the report."""

from .metrics import h_identities, h_objects, h_styles, pixel_drift, ssim

__all__ = ["h_identities", "h_objects", "h_styles", "pixel_drift", "ssim"]
