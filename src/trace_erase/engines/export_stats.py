"""The closed-form statistics an export needs, gathered once: the metric of the Gram-weighted truncation and the
certificate of the exported (truncated) delta (both joined to the exporter in :func:`trace_erase.api.export_erasure`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .closed_form import ClosedFormConfig, ClosedFormEngine
from .gram import GramStats

if TYPE_CHECKING:
    from ..artifacts.erasure import Erasure


class ExportStatistics:
    """An erasure's stage-A statistics recomputed from its own concepts and config (prompts are encoded once, on
    first use): per text stream the Gram matrices, and which modules read which input columns."""

    def __init__(self, erasure: Erasure, handle: Any):
        self.erasure, self.handle = erasure, handle
        self._engine: ClosedFormEngine | None = None
        self._stats: dict[str, GramStats] | None = None

    def _ready(self) -> tuple[ClosedFormEngine, dict[str, GramStats]]:
        if self._stats is None:
            from ..config import config_from_dict, make_concepts

            cfg = config_from_dict(ClosedFormConfig, self.erasure.manifest["config"]["closed_form"],
                                   "the erasure's config")
            self._engine = ClosedFormEngine(self.handle.adapter, cfg, progress=False)
            # the words stage A found and preserved in its second solve (neighbours > 0), as the manifest records them
            found = (self.erasure.manifest.get("neighbours") or {}).get("preserved", {})
            self._engine.extra_preserve = list(found)
            self._stats = self._engine.statistics(make_concepts(self.erasure.manifest["concepts"]))
        return self._engine, self._stats

    def _columns(self, stream: Any, name: str) -> tuple[int, int]:
        width = self.handle.adapter.module(name).weight.shape[1]
        return stream.columns or (0, width)

    def metrics(self, erasure: Erasure | None = None, handle: Any = None) -> dict[str, tuple[torch.Tensor,
                                                                                        tuple[int, int]]]:
        """Per module of a text stream: G = λI + G_e + λ_p G_p (the solve's normal matrix; with ``rece_rounds`` > 0
        the first round's, as the rounds' added rows are not replayed here) and the input columns it covers. The
        arguments are ignored (the signature of :data:`~trace_erase.artifacts.export.MetricSource`)."""
        engine, stats = self._ready()
        lam, lam_p = engine.config.lambda_reg, engine.config.lambda_preserve
        out = {}
        for stream in engine.streams:
            st = stats[stream.name]
            g = lam * torch.eye(st.dim, dtype=torch.float64) + st.g_e + lam_p * st.g_p
            for name in stream.modules:
                out[name] = (g, self._columns(stream, name))
        return out

    def certify(self, erasure: Erasure | None, handle: Any, exported: dict[str, torch.Tensor],
                exact: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """The certificate of each exported delta next to the exact one, per certified module (the signature of
        :data:`~trace_erase.artifacts.export.Certifier`; the first two arguments are ignored)."""
        from .certificate import certify_delta

        engine, stats = self._ready()
        out: dict[str, dict[str, Any]] = {}
        for stream in engine.streams:
            for name in stream.modules:
                if name not in exported or name not in exact:
                    continue
                full = self.handle.adapter.module(name).weight.detach().double().cpu()
                lo, hi = self._columns(stream, name)
                out[name] = {"exact": certify_delta(stats[stream.name], full[:, lo:hi], exact[name][:, lo:hi]),
                             "exported": certify_delta(stats[stream.name], full[:, lo:hi],
                                                       exported[name][:, lo:hi])}
        return out

    def deviation(self, exported: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """How far an exported delta moves preserved and probe features from where the exact edit puts them, per
        module: ‖(ΔW_exported − ΔW_exact) p‖ / ‖W p‖ summed over the rows (None without such rows)."""
        engine, stats = self._ready()
        out: dict[str, dict[str, Any]] = {}
        for stream in engine.streams:
            st = stats[stream.name]
            for name in stream.modules:
                if name not in exported or name not in exact:
                    continue
                lo, hi = self._columns(stream, name)
                w = self.handle.adapter.module(name).weight.detach().double().cpu()[:, lo:hi]
                d = (exported[name] - exact[name])[:, lo:hi].double()
                out[name] = {"preserve": _ratio(d, w, st.g_p, st.counts["preserve"]),
                             "probe": _ratio(d, w, st.g_q, st.counts["probe"])}
        return out


def _ratio(d: torch.Tensor, w: torch.Tensor, g: torch.Tensor, rows: int) -> float | None:
    """sqrt(tr(D G Dᵀ) / tr(W G Wᵀ)), or None without rows."""
    den = float(((w @ g) * w).sum())
    return (max(float(((d @ g) * d).sum()), 0.0) / den) ** 0.5 if rows and den > 0 else None
