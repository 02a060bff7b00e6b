"""The closed-form engine: TRACE stage A, UCE and MACE-CFR are configurations of it.

For every text-carrying projection W it solves (TRACE stage A; the algebra is written out in docs/methods.md)

    W' = argmin Σ_i ||W' e_i − W a_i||² + λ_p Σ_j ||W' p_j − W p_j||² + λ ||W' − W||²_F

where e_i are features of prompts with the concept, a_i the features at the aligned positions of the same prompt
with the anchor, and p_j preserved features. With the Gram matrices G_e = Σ e eᵀ, C = Σ e aᵀ, G_p = Σ p pᵀ the
solution is W' = W·S with S = (λI + Cᵀ + λ_p G_p)(λI + G_e + λ_p G_p)⁻¹. S depends only on the features, so every
projection that reads the same features (a *stream*) shares one d×d solve: 100 concepts cost one solve per stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Concept
from ..errors import TraceEraseError
from ..models.base import FamilyAdapter, SegmentedLayout, TextStream, TokenLayout
from .certificate import StreamCertifier
from .closed_form_config import ClosedFormConfig
from .gram import ConceptGram, GramStats
from .neighbours import select_neighbours
from .positions import TRCE_TOKEN_WEIGHTS, aligned_positions, class_positions
from .prompts import ATTRIBUTE_TEMPLATES, DEFAULT_TEMPLATES, fill, load_corpus
from .rece import projection_gram, rece_solve

DEFAULT_PROBES: tuple[str, ...] = (
    "a photo of a house",
    "a landscape with mountains and a river",
    "a portrait of a woman",
    "a red car in a city street",
    "a bird on a tree",
    "a bowl of fruit on a table",
    "a boat on the sea",
    "a painting of flowers",
)


@dataclass
class RowBatch:
    """Feature rows of one stream: erase pairs (e, a), preserved rows p, or probe rows q."""

    stream: str
    kind: str  # "erase" | "preserve" | "probe"
    e: torch.Tensor
    a: torch.Tensor | None = None
    concept: int | None = None  # erase rows: the index of the concept whose prompts they come from


@dataclass
class ClosedFormResult:
    """Per-module weight deltas (float64), the shared solve per stream, and the erasure certificate."""

    deltas: dict[str, torch.Tensor]
    certificate: dict[str, dict[str, float | None]]
    streams: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    timings: dict[str, float]
    rece: dict[str, list[float]] = field(default_factory=dict)  # per stream: what each RECE round's search recovered
    # neighbours on: {"preserved": word → share the first solve moved it, "concepts": concept → its own share}
    neighbours: dict[str, dict[str, float]] | None = None


def _rows(features: torch.Tensor, positions: list[int] | None = None, scale: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Feature rows ``[n, d]`` at token ``positions`` (all when None), each multiplied by its ``scale`` (√ of its
    weight in the Gram matrices; None: 1); a leading axis of denoiser states (hooked streams, ``[K, L, d]``)
    contributes each state's rows."""
    if positions is not None:
        features = features[..., positions, :]
    if scale is not None:
        features = features * scale.to(features.dtype)[:, None]
    return features.reshape(-1, features.shape[-1])


def _scaled(rows: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``rows`` × ``scale`` (None: unchanged)."""
    return rows if scale is None else rows * scale


class ClosedFormEngine:
    """Collects feature statistics through a family adapter, solves per stream and certifies per module."""

    def __init__(self, adapter: FamilyAdapter, config: ClosedFormConfig, progress: bool = True):
        self.adapter = adapter
        self.config = config
        self.progress = progress
        self.streams: list[TextStream] = adapter.text_streams(config.targets)
        self.encode_seconds = 0.0
        self.prompts_encoded = 0
        self.extra_preserve: list[str] = []  # the neighbours found by gather(), preserved under every template
        self.neighbour_record: dict[str, dict[str, float]] | None = None

    # ---- validation ---------------------------------------------------------------------------------------------
    def check_concepts(self, concepts: list[Concept]) -> None:
        """Refuse concepts, anchors or preserve texts that do not fit in a prompt."""
        capacity = self.adapter.prompt_capacity()
        longest_template = max(self.adapter.count_tokens(fill(t, "")[0]) for t in self.templates)
        for c in concepts:
            for text in (c.name, c.anchor, *c.preserve):
                n = self.adapter.count_tokens(text)
                if n + longest_template > capacity:
                    raise TraceEraseError(
                        f"'{text[:40]}…' takes {n} tokens; with the prompt templates at most "
                        f"{capacity - longest_template} fit the text encoder's {capacity}; shorten it"
                    )

    @property
    def templates(self) -> list[str]:
        extra = list(ATTRIBUTE_TEMPLATES) if self.config.attribute_contexts else []
        return list(self.config.templates or DEFAULT_TEMPLATES) + extra

    # ---- rows -----------------------------------------------------------------------------------------------------
    def positions(self, lt: TokenLayout | SegmentedLayout, la: TokenLayout | SegmentedLayout, stream: TextStream,
                  scale: float | None = None) -> tuple[list[int], list[int], torch.Tensor | None]:
        """Target positions, the anchor positions they map to, and each row's scale (√weight × ``scale``; None when
        every row counts once): the selection's aligned positions, or TRCE's weighted token classes."""
        cfg = self.config
        if cfg.token_selection != "trce":
            t, a = aligned_positions(lt, la, cfg.token_selection, cfg.suffix_tokens, stream.bidirectional)
            return t, a, None if scale is None else torch.full((len(t),), scale)
        if not isinstance(lt, TokenLayout) or not isinstance(la, TokenLayout):
            raise TraceEraseError("token_selection=trce needs a single CLIP token sequence (SD1.x/2.x, SDXL); "
                                  "pick another token_selection for this model")
        t, a, w = class_positions(lt, la, cfg.token_weights or TRCE_TOKEN_WEIGHTS)
        return t, a, torch.tensor(w, dtype=torch.float64).sqrt() * (1.0 if scale is None else scale)

    def encode(self, prompts: list[str], desc: str) -> dict[str, dict[str, torch.Tensor]]:
        """Encode each distinct prompt once, batched; features kept in float32 on the CPU."""
        import time

        start = time.perf_counter()
        unique = list(dict.fromkeys(prompts))
        out: dict[str, dict[str, torch.Tensor]] = {}
        bs = self.config.batch_size
        for i in tqdm(range(0, len(unique), bs), desc=desc, disable=not self.progress or len(unique) <= bs):
            chunk = unique[i : i + bs]
            feats = self.adapter.stream_features(chunk, self.streams)
            for k, p in enumerate(chunk):
                out[p] = {name: f[k].float().cpu() for name, f in feats.items()}
        self.encode_seconds += time.perf_counter() - start
        self.prompts_encoded += len(unique)
        return out

    def iter_rows(self, concepts: list[Concept]) -> Iterator[RowBatch]:
        """All feature rows the solve uses, stream by stream (the Gram path and the tests consume the same rows)."""
        cfg = self.config
        jobs = []  # (target prompt, span, anchor prompt, span, concept index)
        keep: list[tuple[str, tuple[int, int]]] = []  # preserved prompts
        for ci, c in enumerate(concepts):
            for t in self.templates:
                pt, st = fill(t, c.name)
                pa, sa = fill(t, c.anchor)
                jobs.append((pt, st, pa, sa, ci))
                for p in c.preserve:
                    keep.append(fill(t, p))
        keep += [fill(t, p) for p in self.extra_preserve for t in self.templates]
        corpus = load_corpus(self.adapter, cfg.preserve_corpus, concepts) if cfg.preserve_corpus else []
        probes = list(cfg.probe_prompts if cfg.probe_prompts is not None else DEFAULT_PROBES)

        # mean statistics (TRCE's scaling): every erase row × 1/√pairs, every preserved row × 1/√(preserved prompts)
        pair_scale = len(jobs) ** -0.5 if cfg.mean_statistics else None
        keep_scale = max(len(keep) + len(corpus), 1) ** -0.5 if cfg.mean_statistics else None
        fixed = self.encode([j[2] for j in jobs] + [k[0] for k in keep] + corpus + probes, "encoding anchors")
        layouts: dict[tuple[str, tuple[int, int]], TokenLayout | SegmentedLayout] = {}

        def layout(prompt: str, span: tuple[int, int]) -> TokenLayout | SegmentedLayout:
            key = (prompt, span)
            if key not in layouts:
                layouts[key] = self.adapter.token_layout(prompt, span)
            return layouts[key]

        bs = cfg.batch_size
        for i in tqdm(range(0, len(jobs), bs), desc="encoding concepts", disable=not self.progress or len(jobs) <= bs):
            chunk = jobs[i : i + bs]
            feats = self.encode([j[0] for j in chunk], "")
            for stream in self.streams:
                rows: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
                for pt, st, pa, sa, ci in chunk:
                    ft, fa = feats[pt][stream.name], fixed[pa][stream.name]
                    es, as_ = rows.setdefault(ci, ([], []))
                    if stream.per_token:
                        ti, ai, w = self.positions(layout(pt, st), layout(pa, sa), stream, pair_scale)
                        es.append(_rows(ft, ti, w))
                        as_.append(_rows(fa, ai, w))
                    else:
                        es.append(_scaled(_rows(ft), pair_scale))
                        as_.append(_scaled(_rows(fa), pair_scale))
                for ci, (es, as_) in rows.items():
                    yield RowBatch(stream.name, "erase", torch.cat(es), torch.cat(as_), concept=ci)
        for stream in self.streams:
            rows = []
            for prompt, span in keep:
                f = fixed[prompt][stream.name]
                if stream.per_token:
                    lp = layout(prompt, span)
                    pos, _, w = self.positions(lp, lp, stream, keep_scale)
                    rows.append(_rows(f, pos, w))
                else:
                    rows.append(_scaled(_rows(f), keep_scale))
            for caption in corpus:
                rows.append(_scaled(_rows(fixed[caption][stream.name]), keep_scale))
            if rows:
                yield RowBatch(stream.name, "preserve", torch.cat(rows))
            probe_rows = [_rows(fixed[p][stream.name]) for p in probes]
            if probe_rows:
                yield RowBatch(stream.name, "probe", torch.cat(probe_rows))

    def statistics(self, concepts: list[Concept]) -> dict[str, GramStats]:
        """Accumulate the Gram matrices of every stream (float64)."""
        stats: dict[str, GramStats] = {}
        for batch in self.iter_rows(concepts):
            st = stats.setdefault(batch.stream, GramStats(batch.e.shape[1]))
            if batch.kind == "erase":
                st.add_erase(batch.e, batch.a)
            elif batch.kind == "preserve":
                st.add_preserve(batch.e)
            else:
                st.add_probe(batch.e)
        return stats

    def concept_statistics(self, concepts: list[Concept]) -> tuple[list[dict[str, ConceptGram]],
                                                                      dict[str, GramStats]]:
        """One encoding pass for both stage A and a fusion of per-concept LoRAs: per concept and stream the Gram of
        its own erase rows (Cᵢ = Σ e eᵀ in float32, nothing else: 100 concepts at d = 768 hold 235 MB, not the
        2.4 GB of full statistics), and the joint statistics :meth:`statistics` would give."""
        per: list[dict[str, ConceptGram]] = [{} for _ in concepts]
        joint: dict[str, GramStats] = {}
        for batch in self.iter_rows(concepts):
            st = joint.setdefault(batch.stream, GramStats(batch.e.shape[1]))
            if batch.kind == "erase":
                st.add_erase(batch.e, batch.a)
                e = batch.e.double()
                own = per[batch.concept].setdefault(batch.stream, ConceptGram(torch.zeros_like(st.g_e).float()))
                own.g_e += (e.T @ e).float()  # summed per batch in float64, kept in float32 (half the memory)
                own.rows += e.shape[0]
            elif batch.kind == "preserve":
                st.add_preserve(batch.e)
            else:
                st.add_probe(batch.e)
        return per, joint

    def gather(self, concepts: list[Concept], per_concept: bool = False) -> Any:
        """:meth:`statistics` (or :meth:`concept_statistics` with ``per_concept``); with ``neighbours`` on, gathered
        twice: the first solve picks the neighbours (engines/neighbours.py), which the second gathering preserves."""
        collect = self.concept_statistics if per_concept else self.statistics
        out = collect(concepts)
        if self.config.neighbours:
            chosen, own = select_neighbours(self, concepts, out[1] if per_concept else out)
            self.neighbour_record = {"preserved": chosen, "concepts": own}
            if chosen:
                self.extra_preserve = list(chosen)
                out = collect(concepts)
        return out

    # ---- solve ------------------------------------------------------------------------------------------------------
    def stream_solution(self, st: GramStats) -> torch.Tensor:
        """S with W' = W·S for every projection of the stream (a linear solve, never an explicit inverse)."""
        lam, lam_p = self.config.lambda_reg, self.config.lambda_preserve
        eye = torch.eye(st.dim, dtype=torch.float64)
        m = lam * eye + st.g_e + lam_p * st.g_p
        b = lam * eye + st.c.T + lam_p * st.g_p
        try:
            s_t = torch.linalg.solve(m, b.T)  # M symmetric: S = B M⁻¹ ⇔ Sᵀ = M⁻¹ Bᵀ
        except torch.linalg.LinAlgError as exc:  # only possible with lambda_reg = 0
            raise TraceEraseError("the closed-form system is singular with lambda_reg=0 (the preserved captions do "
                                  "not span the features); set lambda_reg > 0, e.g. 1e-4") from exc
        return s_t.T

    def solve(self, stream: TextStream, st: GramStats) -> tuple[torch.Tensor, list[float]]:
        """The stream's S, after ``rece_rounds`` RECE rounds when asked (with what each round's search recovered)."""
        if not self.config.rece_rounds:
            return self.stream_solution(st), []
        k = projection_gram(self._weight(stream, name)[1] for name in stream.modules)
        return rece_solve(st, self.stream_solution, k, self.config.rece_rounds, self.config.rece_lambda)

    def _weight(self, stream: TextStream, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's whole weight (float64, CPU) and its text columns, the part the stream's S acts on."""
        full = self.adapter.module(name).weight.detach().double().cpu()
        lo, hi = stream.columns or (0, full.shape[1])
        return full, full[:, lo:hi]

    def run(self, concepts: list[Concept], stats: dict[str, GramStats] | None = None) -> ClosedFormResult:
        """Statistics (or ``stats`` already gathered, e.g. :meth:`merged`) → one solve per stream → per-module
        deltas and certificate."""
        import time

        self.check_concepts(concepts)
        t0 = time.perf_counter()
        stats = stats if stats is not None else self.gather(concepts)
        t1 = time.perf_counter()
        deltas: dict[str, torch.Tensor] = {}
        cert: dict[str, dict[str, float | None]] = {}
        certify_s = 0.0
        rece: dict[str, list[float]] = {}
        for stream in self.streams:
            st = stats[stream.name]
            s, rece[stream.name] = self.solve(stream, st)
            s_minus_i = s - torch.eye(st.dim, dtype=torch.float64)
            certifier = StreamCertifier(st, s)  # the concept's own rows, whatever RECE added to the solve
            for name in stream.modules:
                full, w = self._weight(stream, name)
                delta = w @ s_minus_i
                tc = time.perf_counter()
                cert[name] = certifier(w)
                certify_s += time.perf_counter() - tc
                if w.shape != full.shape:  # the edit touches only the text columns
                    lo, _ = stream.columns
                    padded = torch.zeros_like(full)
                    padded[:, lo:lo + w.shape[1]] = delta
                    delta = padded
                deltas[name] = delta
        t2 = time.perf_counter()
        return ClosedFormResult(
            deltas=deltas,
            certificate=cert,
            streams={s.name: list(s.modules) for s in self.streams},
            counts={k: dict(v.counts) for k, v in stats.items()},
            timings={
                "encode_s": self.encode_seconds,
                "statistics_s": t1 - t0 - self.encode_seconds,
                "solve_s": t2 - t1 - certify_s,  # S per stream + every projection's ΔW
                "certificate_s": certify_s,
                "prompts_encoded": self.prompts_encoded,
            },
            rece={k: v for k, v in rece.items() if v},
            neighbours=self.neighbour_record,
        )
