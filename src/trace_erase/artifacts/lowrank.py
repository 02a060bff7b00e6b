"""How each module's delta becomes a LoRA (or dense weights), and how it is truncated when ``max_rank`` asks.

Two truncations to rank r: ``svd`` keeps the top singular directions of ΔW (best in the Frobenius norm); ``gram``
keeps the best rank-r approximation in the metric of the text features the layer sees,
ΔW_r = [ΔW G^{1/2}]_r G^{-1/2}, with G = λI + G_e + λ_p G_p the closed-form solve's own normal matrix (erase rows,
preserved rows and its ridge λ, which keeps G invertible). For a closed-form delta ΔW* the solve's objective is
J(ΔW* + D) = J(ΔW*) + ‖D G^{1/2}‖², so ``gram`` is the rank-r edit whose objective — erasure residual and preserved
features together — is closest to the exact edit's. Modules with no statistics (stage-B modules outside the text
streams, conv LoRAs) fall back to ``svd``; each module records which truncation it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .lora import delta_to_lora

TRUNCATIONS = ("gram", "svd")
Metric = tuple[torch.Tensor, tuple[int, int]]  # a stream's G (float64, d×d) and the input columns it covers


@dataclass
class ModuleExport:
    """What one module became: a LoRA of ``rank`` (``a``: [r, in…], ``b``: [out, r…], scale 1) or dense weights.
    ``rel_error`` is ‖ΔW_r − ΔW‖/‖ΔW‖ (Frobenius); ``weighted_error`` the same in the metric G, when it had one."""

    kind: str  # "lora" | "full"
    rank: int
    numerical_rank: int
    rel_error: float
    lora_params: int
    dense_params: int
    a: torch.Tensor | None = field(default=None, repr=False)
    b: torch.Tensor | None = field(default=None, repr=False)
    delta: torch.Tensor | None = field(default=None, repr=False)
    truncation: str | None = None
    weighted_error: float | None = None

    def record(self) -> dict[str, Any]:
        out = {"kind": self.kind, "rank": self.rank, "numerical_rank": self.numerical_rank,
               "rel_error": self.rel_error, "lora_params": self.lora_params, "dense_params": self.dense_params}
        if self.truncation is not None:
            out["truncation"] = self.truncation
        if self.weighted_error is not None:
            out["weighted_error"] = self.weighted_error
        return out

    def exported(self) -> torch.Tensor:
        """The delta this module's export applies (float64)."""
        if self.kind == "full":
            return self.delta
        if self.a.dim() == 4:
            return torch.einsum("or,rikl->oikl", self.b[:, :, 0, 0], self.a)
        return self.b @ self.a


def dense_delta(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ B·A in float64; for a conv LoRA (A [r, in, k, k], B [out, r, 1, 1]) the full kernel delta."""
    total = None
    for a, b in pairs:
        if a.dim() == 4:
            d = torch.einsum("or,rikl->oikl", b.double()[:, :, 0, 0], a.double())
        else:
            d = b.double() @ a.double()
        total = d if total is None else total + d
    return total


def metric_roots(metric: Metric, d_in: int, eps: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^{1/2}, G^{-1/2}) over all ``d_in`` input columns: the stream's G on its columns (eigenvalues floored at
    ``eps`` × their mean, so it is invertible), its mean eigenvalue elsewhere (columns the stream does not read)."""
    g, (lo, hi) = metric
    evals, evecs = torch.linalg.eigh(g.double())
    mean = float(evals.clamp_min(0).mean())
    evals = evals.clamp_min(eps * mean if mean > 0 else eps)
    root = torch.eye(d_in, dtype=torch.float64) * math.sqrt(evals.mean())
    inv = torch.eye(d_in, dtype=torch.float64) / math.sqrt(evals.mean())
    root[lo:hi, lo:hi] = (evecs * evals.sqrt()) @ evecs.T
    inv[lo:hi, lo:hi] = (evecs * evals.rsqrt()) @ evecs.T
    return root, inv


def gram_truncate(delta: torch.Tensor, metric: Metric, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``delta`` in the metric G: (A, B, relative error in that metric)."""
    root, inv = metric_roots(metric, delta.shape[1])
    u, s, vh = torch.linalg.svd(delta @ root, full_matrices=False)
    r = min(rank, s.numel())
    half = s[:r].sqrt()
    total = float((s**2).sum())
    error = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    return (half[:, None] * vh[:r]) @ inv, u[:, :r] * half[None, :], error


def weighted_error(delta: torch.Tensor, approx: torch.Tensor, metric: Metric) -> float:
    """‖(approx − delta) G^{1/2}‖ / ‖delta G^{1/2}‖."""
    root, _ = metric_roots(metric, delta.shape[1])
    den = float((delta @ root).norm())
    return float(((approx - delta) @ root).norm()) / den if den > 0 else 0.0


def plan_module(pairs: list[tuple[torch.Tensor, torch.Tensor]], fmt: str, max_rank: int | None,
                rank_tolerance: float, dense_fallback: bool = True, truncation: str = "svd",
                metric: Metric | None = None) -> ModuleExport:
    """Decide how one module is exported and compute its factors (or dense delta) and reconstruction error.
    ``dense_fallback``: write the module dense when a LoRA of its numerical rank would be larger (no ``max_rank``);
    a ``--target`` export turns it off, since its readers load only the LoRA."""
    delta = dense_delta(pairs)
    dense_params = delta.numel()
    if fmt == "full" and delta.dim() == 4:
        return ModuleExport("full", 0, 0, 0.0, 0, dense_params, delta=delta)
    if delta.dim() == 4:  # conv LoRA: kept as trained (already low rank), zero padding dropped
        a = torch.cat([p[0] for p in pairs]).double()
        b = torch.cat([p[1] for p in pairs], dim=1).double()
        keep = (a.flatten(1).abs().sum(1) > 0) & (b.flatten(2).abs().sum((0, 2)) > 0)
        a, b = a[keep], b[:, keep]
        r = a.shape[0]
        return ModuleExport("lora", r, r, 0.0, a.numel() + b.numel(), dense_params, a=a, b=b)
    s = torch.linalg.svdvals(delta)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return ModuleExport("lora", 0, 0, 0.0, 0, dense_params, a=delta.new_zeros(0, delta.shape[1]),
                            b=delta.new_zeros(delta.shape[0], 0))
    numerical = int((s > rank_tolerance * s[0]).sum())
    per_rank = delta.shape[0] + delta.shape[1]
    if fmt == "full" or (dense_fallback and max_rank is None and numerical * per_rank >= dense_params):
        return ModuleExport("full", 0, numerical, 0.0, numerical * per_rank, dense_params, delta=delta)
    r = min(numerical, max_rank or numerical)
    if r < numerical and truncation == "gram" and metric is not None:
        a, b, werr = gram_truncate(delta, metric, r)
        error = float((b @ a - delta).norm() / delta.norm())
        return ModuleExport("lora", r, numerical, error, r * per_rank, dense_params, a=a, b=b, truncation="gram",
                            weighted_error=werr)
    total = float((s**2).sum())
    error = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    a, b = delta_to_lora(delta, rank_tolerance)
    a, b = a[:r], b[:, :r]
    cut = r < numerical
    return ModuleExport("lora", r, numerical, error, r * per_rank, dense_params, a=a, b=b,
                        truncation="svd" if cut else None,
                        weighted_error=weighted_error(delta, b @ a, metric) if cut and metric is not None else None)
