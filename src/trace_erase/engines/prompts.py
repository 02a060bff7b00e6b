"""Prompt augmentation: templates that place a concept in varied contexts, with the concept's character span."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TraceEraseError

if TYPE_CHECKING:
    from ..config import Concept
    from ..models.base import FamilyAdapter

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

# Attribute contexts (ours): the concept inside generic colour / texture / setting phrases, so that an edit learned
# on "a photo of {}" also reaches the concept's tokens when attribute words precede or follow it (a text encoder's
# causal attention makes the concept's features depend on them). A generic English list; it avoids the toy suite's
# composition phrasings ("on a … background", "simple", "in the middle") and the toy world's style words; colour
# words are bound to recur in any caption vocabulary.
ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "a red {}", "a blue {}", "a green {}", "a yellow {}", "a pink {}", "a brown {}",
    "a wooden {}", "a metallic {}", "a glossy {}", "a furry {}",
    "a {} in a room", "a {} on a table", "a {} outdoors", "a {} at night",
    "a purple velvet {}", "an orange woven {}", "a white marble {}", "a black rusty {}",
    "a golden {} in the snow", "a gray {} on the grass",
)
# the few stage B's trajectories are also sampled under (as many as its default training templates, so half the
# trajectories show the concept plain and half with attributes)
ATTRIBUTE_TRAIN_TEMPLATES: tuple[str, ...] = (
    "a red wooden {}", "a blue {} on a table", "a green metallic {} at night", "a yellow {} outdoors",
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


BUILTIN_CORPUS = Path(__file__).parent / "data" / "preserve_captions.txt"


def corpus_path(path: str) -> Path:
    """The file behind a corpus option (``"builtin"`` or a path); a missing one is refused here, before any work."""
    p = BUILTIN_CORPUS if path == "builtin" else Path(path)
    if not p.is_file():
        raise TraceEraseError(f"preserve corpus '{path}' does not exist; give a text file with one caption per line, "
                              "or 'builtin'")
    return p


def read_corpus(path: str, concepts: list[Concept] = ()) -> list[str]:
    """Captions of a preserve corpus (``"builtin"``: our ~120 everyday scene captions), without the captions that
    mention an erased concept or its anchor — preserving those would pull against the erasure."""
    p = corpus_path(path)
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise TraceEraseError(f"preserve corpus '{path}' is empty")
    words = [c.name.lower() for c in concepts] + [c.anchor.lower() for c in concepts if c.anchor.strip()]
    return [ln for ln in lines if not any(re.search(rf"\b{re.escape(w)}(s|es)?\b", ln.lower()) for w in words)]


def fit_caption(adapter: FamilyAdapter, caption: str) -> str:
    """A caption cut at a word boundary to what the adapter's text encoder reads (no truncation warnings)."""
    words, capacity = caption.split(), adapter.prompt_capacity()
    while len(words) > 1 and adapter.count_tokens(" ".join(words)) > capacity:
        words.pop()
    return " ".join(words)


def load_corpus(adapter: FamilyAdapter, path: str, concepts: list[Concept] = ()) -> list[str]:
    """:func:`read_corpus`, each caption fitted to the adapter's prompt capacity (both engines use this)."""
    return [fit_caption(adapter, c) for c in read_corpus(path, concepts)]
