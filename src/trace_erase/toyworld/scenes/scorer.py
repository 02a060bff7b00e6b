"""The scene scorer: one small CNN applied to each 32×32 slot (heads: class or 'empty', colour, style), plus a
background head on the whole picture (the mean of both slots' features).

Its trunk has the single-object classifier's layout and training starts from that classifier's trunk, so a short
fine-tune on scene renders (with light blur, noise and colour jitter, to tolerate the VAE's reconstructions) suffices.
Training seeds start at 10⁶; held-out seeds at 9·10⁶ (the tests use 8·10⁶).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import TraceEraseError
from ..data import to_tensor
from ..render import BACKGROUNDS, CLASSES, COLORS, STYLES
from .render import SIDES, SLOT, Scene, random_scene, render_scene

EMPTY = "empty"
SLOT_HEADS: dict[str, tuple[str, ...]] = {"class": (*CLASSES, EMPTY), "color": tuple(COLORS), "style": STYLES}
SCENE_HEADS: dict[str, tuple[str, ...]] = {"background": tuple(BACKGROUNDS)}
SCORER_DIR = Path(__file__).resolve().parent.parent / "assets" / "scenes"
TRAIN_FIRST_SEED, HELDOUT_FIRST_SEED = 1_000_000, 9_000_000
IGNORE = -100  # colour/style target of an empty slot


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class SceneScorer(nn.Module):
    """Per-slot conv trunk (32→64→128 channels), per-slot heads, and a whole-picture background head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.trunk = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in SLOT_HEADS.items()})
        self.background = nn.Linear(4 * width, len(SCENE_HEADS["background"]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[N, 3, 32, 64]`` in [-1, 1] → per-slot logits ``[N, 2, K]`` (left, right), background ``[N, K]``."""
        n = x.shape[0]
        slots = torch.stack([x[..., k * SLOT:(k + 1) * SLOT] for k in range(len(SIDES))], 1).flatten(0, 1)
        h = self.trunk(slots).view(n, len(SIDES), -1)
        out = {k: head(h) for k, head in self.heads.items()}
        out["background"] = self.background(h.mean(1))
        return out

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Label indices: per-slot heads ``[N, 2]`` (left, right), background ``[N]``, for uint8 ``[N, 32, 64, 3]``
        pictures (or a float tensor ``[N, 3, 32, 64]`` in [-1, 1])."""
        self.eval()
        x = to_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if tuple(x.shape[-2:]) != (SLOT, len(SIDES) * SLOT):
            raise TraceEraseError(f"the scene scorer takes 32×64 pictures, got {tuple(x.shape[-2:])}; "
                                  f"pass scene renders or scene-model samples")
        outs: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(x), batch_size):
            for k, v in self(x[i:i + batch_size]).items():
                outs.setdefault(k, []).append(v.argmax(-1).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}

    def predict_labels(self, images: np.ndarray | torch.Tensor) -> list[dict]:
        """Per picture: ``{"left": {"class", "color", "style"}, "right": {...}, "background"}`` as names; an empty
        slot has class 'empty' and colour/style ``None`` (the input of :mod:`.metrics`)."""
        pred = self.predict(images)
        out = []
        for i in range(len(pred["background"])):
            row: dict = {"background": SCENE_HEADS["background"][int(pred["background"][i])]}
            for k, side in enumerate(SIDES):
                slot = {h: SLOT_HEADS[h][int(pred[h][i, k])] for h in SLOT_HEADS}
                if slot["class"] == EMPTY:
                    slot["color"] = slot["style"] = None
                row[side] = slot
            out.append(row)
        return out


def render_scene_set(first_seed: int, n: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes (seeds ``first_seed ..``) and their uint8 ``[n, 32, 64, 3]`` renders."""
    scenes = [random_scene(first_seed + i) for i in range(n)]
    return np.stack([render_scene(s, first_seed + i) for i, s in enumerate(scenes)]), scenes


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Integer targets: per-slot ``[n, 2]`` (colour/style of an empty slot: ignored), background ``[n]``."""
    def idx(obj, head: str) -> int:
        if obj is None:
            return SLOT_HEADS["class"].index(EMPTY) if head == "class" else IGNORE
        return SLOT_HEADS[head].index({"class": obj.cls, "color": obj.color, "style": obj.style}[head])

    out = {h: torch.tensor([[idx(s.slot(side), h) for side in SIDES] for s in scenes]) for h in SLOT_HEADS}
    out["background"] = torch.tensor([SCENE_HEADS["background"].index(s.background) for s in scenes])
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light blur (mix with a 3×3 box blur), per-channel colour shift and pixel noise, per picture."""
    n = x.shape[0]
    blur = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = torch.rand(n, 1, 1, 1, generator=gen) * 0.8
    x = (1 - alpha) * x + alpha * blur
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.08
    return x + torch.randn(x.shape, generator=gen) * 0.07 * torch.rand(n, 1, 1, 1, generator=gen)


def train_scene_scorer(n_train: int = 12000, epochs: int = 4, seed: int = 0, init_from_classifier: bool = True,
                       batch_size: int = 64) -> SceneScorer:
    """Train on ``n_train`` random scene renders (seeds from 10⁶); the trunk and the shared heads' rows start from
    the bundled single-object classifier when ``init_from_classifier``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, scenes = render_scene_set(TRAIN_FIRST_SEED, n_train)
    x_all, y_all = to_tensor(images), scene_targets(scenes)
    model = SceneScorer()
    if init_from_classifier:
        from ..classifier import load_classifier

        single = load_classifier()
        model.trunk.load_state_dict(single.trunk.state_dict())
        with torch.no_grad():
            for k in SLOT_HEADS:
                rows = single.heads[k].weight.shape[0]
                model.heads[k].weight[:rows] = single.heads[k].weight
                model.heads[k].bias[:rows] = single.heads[k].bias
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            logits = model(augment(x_all[idx], gen))
            loss = nn.functional.cross_entropy(logits["background"], y_all["background"][idx])
            for k in SLOT_HEADS:
                loss = loss + nn.functional.cross_entropy(logits[k].flatten(0, 1), y_all[k][idx].flatten(),
                                                          ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def heldout_accuracy(model: SceneScorer, n: int = 2000, first_seed: int = HELDOUT_FIRST_SEED) -> dict[str, float]:
    """Accuracy per head on fresh renders: class over all slots (incl. 'empty'), colour and style over filled
    slots, background over pictures."""
    images, scenes = render_scene_set(first_seed, n)
    pred, y = model.predict(images), scene_targets(scenes)
    out = {}
    for k in (*SLOT_HEADS, "background"):
        t = y[k].numpy()
        keep = t != IGNORE
        out[k] = float((pred[k][keep] == t[keep]).mean())
    return out


def save_scene_scorer(model: SceneScorer, folder: Path, info: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` (heads, label names, training seeds, held-out accuracy)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"per_slot": True, "width": model.width, "slot_heads": {k: list(v) for k, v in SLOT_HEADS.items()},
           "scene_heads": {k: list(v) for k, v in SCENE_HEADS.items()}, **info}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_scene_scorer(folder: str | Path | None = None) -> SceneScorer:
    """The bundled scene scorer (or one saved at ``folder``); refuses a scorer without per-slot heads."""
    from safetensors.torch import load_file

    path = Path(folder) if folder else SCORER_DIR
    weights, cfg_path = path / "model.safetensors", path / "config.json"
    if not weights.is_file():
        raise TraceEraseError(f"no scene scorer at '{path}'; train one with "
                              f"`python -m trace_erase.toyworld.scenes.scorer` (train_scene_scorer)")
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    state = load_file(str(weights))
    head = state.get("heads.class.weight")
    if not cfg.get("per_slot") or head is None or head.shape[0] != len(SLOT_HEADS["class"]) \
            or "background.weight" not in state:
        raise TraceEraseError(f"'{path}' holds a scorer without per-slot heads (class+empty, colour, style, "
                              f"background), e.g. the single-object toy classifier; use load_scene_scorer() with no "
                              f"folder, or train one with train_scene_scorer()")
    model = SceneScorer(width=int(cfg.get("width", 32)))
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    """Train, measure on held-out renders and save the bundled scorer (about 5 minutes on one CPU core)."""
    torch.set_num_threads(1)
    n_train, epochs, n_heldout = 12000, 4, 2000
    t0 = time.time()
    model = train_scene_scorer(n_train=n_train, epochs=epochs)
    seconds = time.time() - t0
    acc = heldout_accuracy(model, n=n_heldout)
    info = {"training": {"first_seed": TRAIN_FIRST_SEED, "n": n_train, "epochs": epochs, "seed": 0,
                         "init": "bundled toy classifier", "seconds": round(seconds, 1), "torch_threads": 1},
            "heldout": {"first_seed": HELDOUT_FIRST_SEED, "n": n_heldout}, "heldout_accuracy": acc}
    save_scene_scorer(model, SCORER_DIR, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
