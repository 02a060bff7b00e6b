"""The closed-form engine's sufficient statistics: Gram matrices per text stream, enough to solve stage A, certify it
and run RECE-style rounds without keeping a single feature row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GramStats:
    """Sufficient statistics of one stream (float64): enough to solve and to certify without the rows."""

    dim: int
    g_e: torch.Tensor = None  # Σ e eᵀ
    c: torch.Tensor = None  # Σ e aᵀ
    g_a: torch.Tensor = None  # Σ a aᵀ
    g_p: torch.Tensor = None  # Σ p pᵀ (preserved)
    g_q: torch.Tensor = None  # Σ q qᵀ (probes: certificate only)
    counts: dict[str, int] = field(default_factory=lambda: {"erase": 0, "preserve": 0, "probe": 0})

    def __post_init__(self) -> None:
        for name in ("g_e", "c", "g_a", "g_p", "g_q"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.dim, self.dim, dtype=torch.float64))

    def add_erase(self, e: torch.Tensor, a: torch.Tensor) -> None:
        e, a = e.double(), a.double()
        self.g_e += e.T @ e
        self.c += e.T @ a
        self.g_a += a.T @ a
        self.counts["erase"] += e.shape[0]

    def erasure_gap(self) -> torch.Tensor:
        """Σ (e − a)(e − a)ᵀ: with K = WᵀW, ⟨K, ·⟩ is Σ||W e − W a||², what the edit has to close."""
        return self.g_e - self.c - self.c.T + self.g_a

    def add_preserve(self, p: torch.Tensor) -> None:
        p = p.double()
        self.g_p += p.T @ p
        self.counts["preserve"] += p.shape[0]

    def add_probe(self, q: torch.Tensor) -> None:
        q = q.double()
        self.g_q += q.T @ q
        self.counts["probe"] += q.shape[0]


@dataclass
class ConceptGram:
    """One concept's own token Gram Cᵢ = Σ e eᵀ (float32) and its row count."""

    g_e: torch.Tensor
    rows: int = 0
