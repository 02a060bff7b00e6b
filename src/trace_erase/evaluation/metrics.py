"""Metric formulas of the concept-erasure papers (spec: evaluation protocols), and image drift."""

from __future__ import annotations

import numpy as np


def _inv(x: float) -> float:
    return float("inf") if x <= 0 else 1.0 / x


def h_objects(acc_e: float, acc_s: float, acc_g: float) -> float:
    """H_o = 3 / (1/(1−Acc_e) + 1/Acc_s + 1/(1−Acc_g)) (MACE protocol); 0 when any factor is 0."""
    denom = _inv(1 - acc_e) + _inv(acc_s) + _inv(1 - acc_g)
    return 0.0 if denom == float("inf") else 3.0 / denom


def h_identities(acc_e: float, acc_s: float) -> float:
    """H_c = 2 / (1/(1−Acc_e) + 1/Acc_s) (celebrities)."""
    denom = _inv(1 - acc_e) + _inv(acc_s)
    return 0.0 if denom == float("inf") else 2.0 / denom


def h_styles(clip_s: float, clip_e: float) -> float:
    """H_a = CLIP_s − CLIP_e (artists)."""
    return clip_s - clip_e


def _to_float(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    return x / 255.0 if x.max() > 1.5 else x


def pixel_drift(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-pixel L2 distance (RGB in [0, 1]) between image batches ``[N, H, W, 3]`` of the same seeds."""
    x, y = _to_float(a), _to_float(b)
    return float(np.sqrt(((x - y) ** 2).sum(-1)).mean())


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM (uniform ``window``×``window``, on luminance) over an image batch; 1 means identical."""
    from numpy.lib.stride_tricks import sliding_window_view

    def lum(z: np.ndarray) -> np.ndarray:
        z = _to_float(z)
        return z @ np.array([0.299, 0.587, 0.114]) if z.ndim == 4 else z

    x, y = lum(a), lum(b)
    c1, c2 = 0.01**2, 0.03**2
    win = min(window, x.shape[1], x.shape[2])

    def local_mean(z: np.ndarray) -> np.ndarray:
        return sliding_window_view(z, (win, win), axis=(1, 2)).mean(axis=(-1, -2))

    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx**2
    vy = local_mean(y * y) - my**2
    cxy = local_mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
