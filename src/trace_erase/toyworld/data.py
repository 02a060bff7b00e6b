"""Rendered datasets (images + labels) for training the toy classifiers and pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .render import CLASSES, COLORS, STYLES, render


@dataclass
class RenderedSet:
    """``images``: uint8 ``[N, H, W, 3]``; ``labels``: one dict per image; ``seeds``: the render seeds."""

    images: np.ndarray
    labels: list[dict]
    seeds: list[int]

    def targets(self) -> dict[str, torch.Tensor]:
        """Integer targets per head (class, style, color)."""
        return {
            "class": torch.tensor([CLASSES.index(lb["class"]) for lb in self.labels]),
            "style": torch.tensor([STYLES.index(lb["style"]) for lb in self.labels]),
            "color": torch.tensor([list(COLORS).index(lb["color"]) for lb in self.labels]),
        }


def render_set(first_seed: int, n: int, size: int = 32, progress: bool = True) -> RenderedSet:
    """Render ``n`` samples with seeds ``first_seed .. first_seed+n-1``."""
    images = np.empty((n, size, size, 3), np.uint8)
    labels = []
    for i in tqdm(range(n), desc="rendering", disable=not progress or n < 2000):
        s = render(first_seed + i, size=size)
        images[i] = s.image
        labels.append(s.labels)
    return RenderedSet(images, labels, list(range(first_seed, first_seed + n)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → float ``[N, 3, H, W]`` in [-1, 1] (the VAE's and classifier's input range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

