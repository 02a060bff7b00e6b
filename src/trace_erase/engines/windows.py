"""Which states of a trajectory the trajectory engine erases at and which it keeps, and how a batch is drawn from
the two windows.

τ always splits the model's time the same way (``adapter.is_late``: LATE is t < τ × the time range, the clean end;
EARLY is the rest, the noisy start). ``keep_end`` says on which side of τ the keep (or positive-guidance) term acts:

* ``noisy`` (the default; TRACE, and ANT's paper and multi-concept code): keep at EARLY (t ≥ τ), erase at LATE;
* ``clean`` (ANT's single-concept code): keep at LATE (t < τ), erase at EARLY — e.g. ``tau=0.14`` keeps the last 7
  of 50 steps.

``window_sampling`` says how a ``window="two"`` batch is drawn: ``pool`` (the default) draws each state uniformly over
a trajectory's steps, so each window gets states in proportion to its length; ``balanced`` draws half the batch from
each window, as ANT's code draws one state from each window per iteration.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceEraseError
from .pool import Pool

KEEP_ENDS = ("noisy", "clean")
WINDOW_SAMPLINGS = ("pool", "balanced")


def check_windows(window: str, keep_end: str, window_sampling: str, batch_size: int, tau: float) -> None:
    """Refuse unknown values, the combinations that would be silently ignored or cannot be drawn, and a clean-end
    keep window over most of the time range (a τ meant for the noisy end)."""
    if keep_end not in KEEP_ENDS:
        raise TraceEraseError(f"unknown keep_end '{keep_end}'; choose one of {', '.join(KEEP_ENDS)}")
    if window_sampling not in WINDOW_SAMPLINGS:
        raise TraceEraseError(f"unknown window_sampling '{window_sampling}'; choose one of "
                              f"{', '.join(WINDOW_SAMPLINGS)}")
    if keep_end != "noisy" and window != "two":
        raise TraceEraseError(f"keep_end={keep_end} moves the keep term of window=two; set window=two, or drop "
                              "keep_end")
    if keep_end == "clean" and tau > 0.5:
        raise TraceEraseError(f"keep_end=clean keeps the field at t < tau, here {tau:g} of the time range; set tau to "
                              "the clean end's share (ANT's single-concept code: tau=0.14)")
    if window_sampling == "balanced" and window != "two":
        raise TraceEraseError("window_sampling=balanced draws from both windows of window=two; set window=two, or "
                              "window_sampling=pool")
    if window_sampling == "balanced" and batch_size % 2:
        raise TraceEraseError(f"window_sampling=balanced draws half the batch from each window; set an even "
                              f"batch_size (e.g. {batch_size + 1})")


def erase_window(adapter: Any, t: torch.Tensor, window: str, tau: float, keep_end: str) -> torch.Tensor:
    """Per state: True where the erase term applies (the rest is the keep window)."""
    if window == "all":
        return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    late = adapter.is_late(t, tau)
    return late if keep_end == "noisy" else ~late


def balanced_draws(pool: Pool, n: int, gen: torch.Generator, adapter: Any, tau: float, keep_end: str,
                   rows: list[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """``n`` (state, time, prompt) draws: the first ``n // 2`` from the keep window, the rest from the erase window,
    each uniform over a pool trajectory and then its steps in that window."""
    xs, ts, ps = [], [], []
    for erase in (False, True):
        late = erase == (keep_end == "noisy")  # the side of τ this half comes from
        part = pool.sample(n // 2 if not erase else n - n // 2, gen, rows,
                           lambda times, late=late: adapter.is_late(times, tau) == late, "LATE" if late else "EARLY")
        for out, got in zip((xs, ts, ps), part, strict=True):
            out.extend(got)
    return xs, ts, ps
