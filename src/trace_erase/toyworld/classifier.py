"""The toy world's classifier: one small CNN with heads for object class, style and colour.

It scores what the toy pipelines draw (the evaluation's toy backend). Trained on rendered images with mild blur and
noise so that slightly soft generated images are judged by their shape, not by their sharpness.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TraceEraseError
from .data import render_set, to_tensor
from .render import CLASSES, COLORS, STYLES

HEADS = {"class": CLASSES, "style": STYLES, "color": tuple(COLORS)}
CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "classifier"


class ToyClassifier(nn.Module):
    """Conv trunk (32→64→128 channels) and one linear head per label kind."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            )

        self.trunk = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Label indices per head for uint8 ``[N, H, W, 3]`` images (or a float tensor in [-1, 1])."""
        self.eval()
        x = to_tensor(images) if isinstance(images, np.ndarray) else images
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="area")
        outs: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size])
            for k, v in logits.items():
                outs[k].append(v.argmax(1).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random mild blur (mix with a 3×3 box blur) and pixel noise."""
    blur = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.7
    x = (1 - alpha) * x + alpha * blur
    return x + torch.randn(x.shape, generator=gen) * 0.06 * torch.rand(x.shape[0], 1, 1, 1, generator=gen)


def train_classifier(n_train: int = 24000, epochs: int = 6, seed: int = 0, progress: bool = True) -> ToyClassifier:
    """Train on ``n_train`` rendered images (seeds from 10⁶, disjoint from the held-out seeds at 9·10⁶)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = render_set(1_000_000, n_train, progress=progress)
    x_all, y_all = to_tensor(data.images), data.targets()
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (n_train // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="training classifier", disable=not progress)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train - 127, 128):
            idx = perm[i : i + 128]
            logits = model(_augment(x_all[idx], gen))
            loss = sum(nn.functional.cross_entropy(logits[k], y_all[k][idx]) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def heldout_accuracy(model: ToyClassifier, n: int = 2000, first_seed: int = 9_000_000) -> dict[str, float]:
    """Accuracy per head on freshly rendered images the classifier never saw."""
    data = render_set(first_seed, n, progress=False)
    pred = model.predict(data.images)
    return {k: float((pred[k] == v.numpy()).mean()) for k, v in data.targets().items()}


def save_classifier(model: ToyClassifier, folder: Path, metrics: dict[str, float]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (heads, label names, held-out accuracy)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"heads": {k: list(v) for k, v in HEADS.items()},
                                                    "heldout_accuracy": metrics}, indent=2) + "\n")


def load_classifier(folder: str | Path | None = None) -> ToyClassifier:
    """The bundled classifier (or one saved at ``folder``)."""
    from safetensors.torch import load_file

    path = Path(folder) if folder else CLASSIFIER_DIR
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise TraceEraseError(f"no toy classifier at '{path}'; train it with `trace-erase toyworld train-classifier`")
    model = ToyClassifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
