"""The scorer interface: images + the suite's prompt items → one judgement per image, plus an identity record.

A judgement is a small JSON-able dict: ``{"label": ...}`` (classification: class, identity, style), ``{"score":
...}`` (CLIP score against the image's own prompt), ``{"counts": {...}, "exposed": n}`` (detection) or, for the
scene suites, ``{"left": {"class", "color", "style"}, "right": {...}, "background": ...}`` (per slot). A suite
says which it needs (:attr:`Suite.needs`); a scorer says which it provides and checks, before any image is drawn,
that it can answer the suite (its labels cover the suite's).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import TraceEraseError
from ..suites import PromptItem, Suite

# what to pass when a suite needs a scorer the user did not give
HINTS = {
    "objects": "--scorer clip:CLIP_FOLDER (zero-shot over the class prompts) or imagenet:WEIGHTS",
    "celebrities": "--scorer face:MODEL.onnx --gallery DIR (one folder of reference images per name)",
    "styles": "--scorer clip:CLIP_FOLDER (CLIP score)",
    "coco": "--scorer clip:CLIP_FOLDER (CLIP score)",
    "nudity": "--scorer nudenet",
    "toy-objects": "--scorer toy",
    "toy-styles": "--scorer toy",
    "toy-scenes": "--scorer scene (the bundled per-slot scene scorer) or scene:FOLDER (one with per-slot heads)",
}


# what each kind gives per image (known before its model loads, so a mismatch fails first)
PROVIDES: dict[str, frozenset[str]] = {
    "toy": frozenset({"label"}),
    "clip": frozenset({"label", "score"}),
    "imagenet": frozenset({"label"}),
    "nudenet": frozenset({"counts"}),
    "face": frozenset({"label"}),
    "scene": frozenset({"slots"}),
}
NEEDS_TEXT = {"slots": "per-slot judgement (class or empty, colour, style of each slot)"}


def check_provides(kind: str, provides: frozenset[str], suite: Suite) -> None:
    """One line when a ``kind`` scorer cannot give the judgement ``suite`` needs."""
    if suite.needs not in provides:
        raise TraceEraseError(f"the {kind} scorer gives {'/'.join(sorted(provides))}, but the {suite.name} suite "
                              f"needs a {NEEDS_TEXT.get(suite.needs, suite.needs)} per image; use "
                              f"{HINTS.get(suite.name, 'another scorer')}")


@dataclass(frozen=True)
class ScorerOptions:
    """Scorer settings the CLI passes through: a face gallery, an ImageNet class map and architecture, the NudeNet
    threshold, whether pickle/TorchScript files may load, and the device scoring runs on."""

    gallery: str | None = None
    class_map: str | None = None
    arch: str | None = None
    allow_pickle: bool = False
    threshold: float = 0.6
    device: str = "cpu"


class Scorer:
    """Base of the scorers: ``kind``, what it ``provides``, its ``identity`` record and :meth:`judge`."""

    kind: str = ""
    provides: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.identity: dict[str, Any] = {"kind": self.kind}

    def check(self, suite: Suite) -> None:
        """Raise one line when this scorer cannot answer ``suite`` (wrong kind of judgement, labels not covered)."""
        check_provides(self.kind, self.provides, suite)

    def judge(self, images: np.ndarray, items: list[PromptItem], suite: Suite) -> list[dict[str, Any]]:
        """One judgement per image (``images[k]`` was drawn for ``items[k]``)."""
        raise NotImplementedError


def digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted): which weights scored the images."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def version(package: str) -> str | None:
    """An installed package's version (None when absent)."""
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def existing(path: str | None, kind: str, what: str) -> Path:
    """``path`` as a Path, or one line naming what to pass when it is missing."""
    if not path:
        raise TraceEraseError(f"--scorer {kind} needs a path: --scorer {kind}:{what}")
    p = Path(path).expanduser()
    if not p.exists():
        raise TraceEraseError(f"scorer file '{path}' not found; pass --scorer {kind}:{what}")
    return p
