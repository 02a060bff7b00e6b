"""The erasure certificate of stage A, from a stream's Gram matrices alone (no rows kept): how far the edited
projection still is from mapping the concept onto the anchor, and how much it moved preserved and probe tokens."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .gram import GramStats


class StreamCertifier:
    """Erasure certificate of every projection W of one stream, from the Gram matrices and S (W' = W·S).

    Each squared norm is tr(W A G Bᵀ Wᵀ) = ⟨A G Bᵀ, WᵀW⟩, so the d×d products are formed once per stream and each
    projection costs one WᵀW: relative erasure residual ||W'e − Wa|| / ||Wa|| and collateral ||ΔW p|| / ||W p||.
    """

    def __init__(self, st: GramStats, s: torch.Tensor):
        sm = s - torch.eye(st.dim, dtype=torch.float64)
        self.counts = st.counts
        self.g_a = st.g_a
        self.residual_new = s @ st.g_e @ s.T - s @ st.c - (s @ st.c).T + st.g_a
        self.residual_old = st.erasure_gap()
        self.preserve = (st.g_p, sm @ st.g_p @ sm.T)
        self.probe = (st.g_q, sm @ st.g_q @ sm.T)

    def __call__(self, w: torch.Tensor) -> dict[str, float | None]:
        k = w.T @ w

        def norm2(m: torch.Tensor) -> float:
            return max(float((m * k).sum()), 0.0)

        target = norm2(self.g_a)

        def ratio(num: torch.Tensor, den: float) -> float:
            return math.sqrt(norm2(num) / den) if den > 0 else 0.0

        def collateral(pair: tuple[torch.Tensor, torch.Tensor], n: int) -> float | None:
            return ratio(pair[1], norm2(pair[0])) if n else None

        return {
            "erasure_residual": ratio(self.residual_new, target),
            "erasure_residual_before": ratio(self.residual_old, target),
            "collateral_preserve": collateral(self.preserve, self.counts["preserve"]),
            "collateral_probe": collateral(self.probe, self.counts["probe"]),
        }


def certify_delta(st: GramStats, w: torch.Tensor, delta: torch.Tensor) -> dict[str, float | None]:
    """The certificate of W' = W + ΔW for any ΔW, not only the solve's W(S − I): a truncated export's delta, or the
    stage-A delta plus an always-on stage-B LoRA on the same projection. ``w`` and ``delta`` are the stream's columns.

    Every squared norm is a trace against a Gram matrix: Σ‖W'e − Wa‖² = tr(W'G_eW'ᵀ) − 2tr(W'CWᵀ) + tr(WG_aWᵀ).
    """
    w, delta = w.double(), delta.double()
    wn = w + delta

    def tr(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> float:  # tr(X G Yᵀ)
        return float(((x @ g) * y).sum())

    target = tr(w, st.g_a, w)

    def ratio(num: float, den: float) -> float:
        return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0

    def collateral(g: torch.Tensor, n: int) -> float | None:
        return ratio(tr(delta, g, delta), tr(w, g, w)) if n else None

    return {
        "erasure_residual": ratio(tr(wn, st.g_e, wn) - 2 * tr(wn, st.c, w) + target, target),
        "erasure_residual_before": ratio(tr(w, st.g_e, w) - 2 * tr(w, st.c, w) + target, target),
        "collateral_preserve": collateral(st.g_p, st.counts["preserve"]),
        "collateral_probe": collateral(st.g_q, st.counts["probe"]),
    }
