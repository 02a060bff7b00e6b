"""Prompt augmentation: templates that place a concept in varied contexts, with the concept's character span."""

from __future__ import annotations

from ..errors import TraceEraseError

# ~30 generic contexts (objects, styles, people); ours, in the spirit of MACE's and UCE's augmented prompts.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "a photo of a {}",
    "an image of {}",
    "a picture of {}",
    "a close-up photo of {}",
    "a high quality photo of {}",
    "a detailed image of {}",
    "a painting of {}",
    "a drawing of {}",
    "a sketch of {}",
    "an illustration of {}",
    "a rendering of {}",
    "an artwork of {}",
    "an artwork by {}",
    "a painting by {}",
    "art in the style of {}",
    "a portrait of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a small {}",
    "a large {}",
    "one {}",
    "a simple image of {}",
    "a colorful picture of {}",
    "{} in a city street",
    "{} in a landscape",
    "{} on a white background",
    "a scene with {}",
    "a view of {}",
)


def fill(template: str, concept: str) -> tuple[str, tuple[int, int]]:
    """``template`` with ``{}`` replaced by ``concept``, and the concept's character span in the result."""
    if template.count("{}") != 1:
        raise TraceEraseError(f"template '{template}' must contain exactly one '{{}}' placeholder")
    head, tail = template.split("{}")
    prompt = head + concept + tail
    return prompt, (len(head), len(head) + len(concept))


def check_templates(templates: list[str] | tuple[str, ...]) -> list[str]:
    """Validate a template list (non-empty, one placeholder each)."""
    if not templates:
        raise TraceEraseError("the template list is empty; give at least one template such as '{}'")
    for t in templates:
        fill(t, "x")
    return list(templates)
