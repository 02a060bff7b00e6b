"""Iterated stage A against the conditioning the edit still maps to the concept (RECE-style; the form is ours).

RECE (Gong et al., ECCV 2024) alternates a closed-form edit with a closed-form search for an embedding that makes
the *edited* model produce the concept again, then erases that embedding too. For one text stream, whose
projections W_l are all edited as W'_l = W_l·S, the embedding that best reproduces an original concept row c is

    c' = argmin_c' Σ_l ||W_l S c' − W_l c||² + μ||c'||² = (SᵀKS + μI)⁻¹ SᵀK c = M c,     K = Σ_l W_lᵀ W_l.

c' is linear in c, so a round needs no rows: the rows {M e_i}, each with its row's anchor target a_i, add
M G_e Mᵀ to Σ e eᵀ and M C to Σ e aᵀ (G_e, C: the concept's own statistics), and S is solved again.

Choices that are ours, not RECE's: every projection of the stream (keys and values) enters K; μ is relative,
``rece_lambda`` × tr(SᵀKS)/d, so one setting carries across models; each round's rows get the anchor targets of the
rows they come from and weight 1; the concept's own rows stay in (RECE re-derives from the concept embedding too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from .gram import GramStats


def projection_gram(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """K = Σ_l W_lᵀ W_l (float64) over a stream's projections (their text columns), one weight at a time: pass a
    generator, and a FLUX stream's 38 float64 copies are never held together."""
    k = None
    for w in weights:
        w = w.double()
        k = w.T @ w if k is None else k + w.T @ w
    return k


def adversarial_map(s: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    """M with c' = M c: the conditioning through which the edit W·S best reproduces W c (regularised)."""
    return ridge_map(s.T @ k @ s, s.T @ k, lam)


def ridge_map(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """(A + μI)⁻¹ B with μ = ``lam`` × tr(A)/d (a linear solve). With A = Σ_l W'_lᵀW'_l and B = Σ_l W'_lᵀW_l it is
    the map M whose c' = M c minimises Σ_l ||W'_l c' − W_l c||² + μ||c'||²; for W'_l = W_l·S, A = SᵀKS and B = SᵀK."""
    mu = lam * float(torch.trace(a)) / a.shape[0]
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + mu * eye, b)


def recovered(s: torch.Tensor, m: torch.Tensor, k: torch.Tensor, st: GramStats) -> float:
    """How much of the erasure the conditioning M e undoes through the edit W·S, over the concept rows and the
    stream's projections: 1 − Σ||W S M e − W e||² / Σ||W a − W e||² (1: the concept's outputs come back exactly;
    0: no closer than the anchor's)."""
    r = s @ m - torch.eye(s.shape[0], dtype=s.dtype)
    num = float((k * (r @ st.g_e @ r.T)).sum())
    den = float((k * st.erasure_gap()).sum())
    return 1.0 - num / den if den > 0 else 0.0


def rece_solve(st: GramStats, solve: Callable[[GramStats], torch.Tensor], k: torch.Tensor, rounds: int,
               lam: float) -> tuple[torch.Tensor, list[float]]:
    """S after ``rounds`` RECE rounds, and how much of the concept each round's adversarial conditioning recovered
    through the S it was found for (the first entry is plain stage A's)."""
    s = solve(st)
    work = replace(st, g_e=st.g_e.clone(), c=st.c.clone())  # the solve reads only G_e, C and G_p
    history = []
    for _ in range(rounds):
        m = adversarial_map(s, k, lam)
        history.append(recovered(s, m, k, st))
        work.g_e += m @ st.g_e @ m.T
        work.c += m @ st.c
        s = solve(work)
    return s, history
