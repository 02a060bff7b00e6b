"""Closed-form integration of per-concept LoRAs (MACE's stage 3, as an exact LoRA; see docs/many-concepts.md).

For the projections of one text stream (all read the same text features e), with W the weights the LoRAs were
trained on, concept i's LoRA ΔWᵢ = BᵢAᵢ and Cᵢ = Σ e eᵀ over concept i's own prompt tokens, P over preserved tokens:

    W* = argmin Σᵢ Σ_e ‖W*e − (W + sᵢΔWᵢ)e‖² + λ_p Σ_p ‖W*p − Wp‖² + λ‖W* − W‖²
       = W + Σᵢ sᵢ ΔWᵢ Cᵢ G⁻¹,   G = Σᵢ Cᵢ + λ_p P + λ I

which is a LoRA of rank Σ rᵢ: up = [s₁B₁ … s_qB_q], down = [A₁C₁G⁻¹; …; A_qC_qG⁻¹] — one d×d solve per stream.
With a null space (``null_space`` > 0, SPEED's idea as an exact projection), every down factor is then multiplied by
(I − UUᵀ), U an orthonormal basis of the retained prompts' token directions (the user's ``--preserve`` prompts in
every template and the empty prompt, every position, BOS included): a retained token e in span(U) gives ΔW*e = 0,
so a retained prompt's K/V are exactly the stage-A model's. ``null_space`` = 1 takes their whole span; below 1 the
fewest leading directions holding that share of their energy.
A naive sum replaces CᵢG⁻¹ by I. A LoRA on a module that does not read the text features (FLUX/SD3 ``add_k/add_v``,
ESD-u's layers) has no Cᵢ: it is summed, and the record says so. Concepts with scale 0 leave the objective (and G):
the result equals the fusion of the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..artifacts.erasure import Erasure
from ..artifacts.lora import concat_loras, pairs_to_state
from ..errors import TraceEraseError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A [r, in], B [out, r])


@dataclass
class FusionInputs:
    """Everything fusion reads: per-concept LoRA factors, the stream each fusable module reads, and per stream each
    concept's token Gram Cᵢ and the preserved Gram P (float64)."""

    factors: list[Factors]
    module_stream: dict[str, str]
    grams: list[dict[str, torch.Tensor]]
    preserve: dict[str, torch.Tensor]
    retained: dict[str, torch.Tensor] = field(default_factory=dict)  # per stream: Gram of the retained prompts' tokens
    observed: bool = False  # the Grams are of inputs observed inside the denoiser (``fusion_observed_grams``)


SPAN_TOLERANCE = 1e-9  # eigenvalues below this share of the largest are numerical zeros (float64 Grams)


def retained_basis(gram: torch.Tensor, share: float) -> torch.Tensor:
    """Orthonormal columns ``[d, k]``: the leading eigenvectors of the retained tokens' Gram holding ``share`` of its
    energy (1: its whole numerical span)."""
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    if values[0] <= 0:
        return vectors[:, :0]
    rank = int((values > SPAN_TOLERANCE * values[0]).sum())
    if share < 1:
        cumulative = torch.cumsum(values, 0) / values.sum()
        rank = min(rank, int((cumulative < share).sum()) + 1)
    return vectors[:, :rank]


def fuse(inputs: FusionInputs, lam: float, lam_preserve: float, scales: list[float] | None = None,
         mode: str = "fuse", null_space: float = 0.0, preserve_growth: float = 0.0
         ) -> tuple[Factors, dict[str, str], list[tuple[int, int]]]:
    """Fused (or, with ``mode="sum"``, summed) factors per module, how each module was combined, and each concept's
    rank slice in them (empty for a concept at scale 0); ``null_space`` > 0 projects the fused down factors off the
    retained prompts' token directions (module docstring); ``preserve_growth`` g weighs P by λ_p·n^g, n the concepts
    fused (those at scale 0 do not count)."""
    q = len(inputs.factors)
    scales = [1.0] * q if scales is None else list(scales)
    active = [i for i in range(q) if scales[i] != 0]
    lam_preserve = lam_preserve * max(len(active), 1) ** preserve_growth
    modules = list(dict.fromkeys(m for f in inputs.factors for m in f))
    # down rows Aᵢ Cᵢ G⁻¹ = (G⁻¹ Cᵢ Aᵢᵀ)ᵀ: one Cholesky factor of G per stream, and all (concept, module) right-hand
    # sides of the stream solved together — r columns each instead of a d×d solve per concept
    downs_fused: dict[tuple[int, str], torch.Tensor] = {}
    if mode == "fuse":
        for stream in dict.fromkeys(inputs.module_stream.values()):
            dim = inputs.preserve[stream].shape[0]
            g = lam * torch.eye(dim, dtype=torch.float64) + lam_preserve * inputs.preserve[stream]
            for i in active:
                g = g + inputs.grams[i][stream].double()
            keys = [(i, m) for i in active for m in modules
                    if inputs.module_stream.get(m) == stream and m in inputs.factors[i]]
            if not keys:
                continue
            rhs = torch.cat([  # one product per concept (Cᵢ read once: the products are memory-bound)
                inputs.grams[i][stream].double()
                @ torch.cat([inputs.factors[i][m][0].double().T for j, m in keys if j == i], dim=1)
                for i in dict.fromkeys(i for i, _ in keys)], dim=1)
            factor, info = torch.linalg.cholesky_ex(g)
            if int(info) == 0:
                sol = torch.cholesky_solve(rhs, factor)
            else:
                try:
                    sol = torch.linalg.solve(g, rhs)
                except torch.linalg.LinAlgError as exc:
                    raise TraceEraseError("the fusion Gram is singular; set fusion_lambda > 0") from exc
            widths = [inputs.factors[i][m][0].shape[0] for i, m in keys]
            if null_space > 0 and stream in inputs.retained:  # down (I − UUᵀ): columns of sol are downᵀ
                basis = retained_basis(inputs.retained[stream], null_space)
                sol = sol - basis @ (basis.T @ sol)
            for key, block in zip(keys, torch.split(sol, widths, dim=1), strict=True):
                downs_fused[key] = block.T
    out: Factors = {}
    how: dict[str, str] = {}
    for m in modules:
        fusable = mode == "fuse" and m in inputs.module_stream
        downs, ups = [], []
        for i in active:
            if m not in inputs.factors[i]:
                continue
            a, b = (t.double() for t in inputs.factors[i][m])
            downs.append(downs_fused[(i, m)] if fusable else a)
            ups.append(scales[i] * b)
        if downs:
            out[m] = (torch.cat(downs), torch.cat(ups, dim=1))
            how[m] = "closed-form" if fusable else "sum"
    slices, lo = [], 0
    for i in range(q):
        r = max((f[0].shape[0] for f in [inputs.factors[i].get(m) for m in modules] if f is not None), default=0)
        slices.append((lo, lo + r) if i in active else (lo, lo))
        lo += r if i in active else 0
    return out, how, slices


def certificate(inputs: FusionInputs, fused: Factors, weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per concept, over its own tokens and the fusable modules (max): how well W* reproduces W + ΔWᵢ
    (‖(ΔW* − ΔWᵢ)e‖ / ‖ΔWᵢe‖), what the naive sum would give, and the change on preserved tokens (‖ΔW*p‖ / ‖Wp‖)."""

    def tr(x: torch.Tensor, g: torch.Tensor) -> float:  # tr(X G Xᵀ)
        return float(((x @ g) * x).sum())

    out = []
    for i, factors in enumerate(inputs.factors):
        rep, naive, kept = [], [], []
        for m, stream in inputs.module_stream.items():
            if m not in factors or m not in fused:
                continue
            c = inputs.grams[i][stream].double()
            own = factors[m][1].double() @ factors[m][0].double()
            total = fused[m][1] @ fused[m][0]
            summed = sum(f[m][1].double() @ f[m][0].double() for f in inputs.factors if m in f)
            den = tr(own, c)
            if den > 0:
                rep.append(math.sqrt(max(tr(total - own, c), 0.0) / den))
                naive.append(math.sqrt(max(tr(summed - own, c), 0.0) / den))
            p = inputs.preserve[stream].double()
            base = tr(weights[m].double(), p)
            if base > 0:
                kept.append(math.sqrt(max(tr(total, p), 0.0) / base))
        out.append({"reproduction_error": max(rep) if rep else None,
                    "naive_sum_reproduction_error": max(naive) if naive else None,
                    "preserved_change": max(kept) if kept else None})
    return out


# ---- saved with a fused erasure, so that it can be re-fused at other per-concept scales ------------------------
def fusion_tensors(inputs: FusionInputs) -> dict[str, torch.Tensor]:
    """What apply-time re-fusion (per-concept scales) needs: each concept's factors and the Grams (float32)."""
    out: dict[str, torch.Tensor] = {}
    for i, factors in enumerate(inputs.factors):
        for m, (a, b) in factors.items():
            out[f"concept.{i}.{m}.lora_A.weight"] = a.float().contiguous()
            out[f"concept.{i}.{m}.lora_B.weight"] = b.float().contiguous()
        for stream, g in inputs.grams[i].items():
            out[f"gram.{i}.{stream}"] = g.float().contiguous()
    for stream, p in inputs.preserve.items():
        out[f"preserve.{stream}"] = p.float().contiguous()
    for stream, r in inputs.retained.items():
        out[f"retained.{stream}"] = r.double().contiguous()  # its span is cut at 1e-9 of the top eigenvalue
    return out


def inputs_from_tensors(tensors: dict[str, torch.Tensor], n: int, module_stream: dict[str, str]) -> FusionInputs:
    """The inverse of :func:`fusion_tensors` (float64)."""
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    preserve: dict[str, torch.Tensor] = {}
    retained: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "concept" and rest.endswith(".lora_A.weight"):
            i, m = rest[:-len(".lora_A.weight")].split(".", 1)
            factors[int(i)][m] = (t.double(), tensors[f"concept.{i}.{m}.lora_B.weight"].double())
        elif kind == "gram":
            i, stream = rest.split(".", 1)
            grams[int(i)][stream] = t.double()
        elif kind == "preserve":
            preserve[rest] = t.double()
        elif kind == "retained":
            retained[rest] = t.double()
    return FusionInputs(factors, module_stream, grams, preserve, retained)


def combine_tensors(tensors: dict[str, torch.Tensor], prefix: str, fusion: dict[str, Any], lam: float,
                    lam_preserve: float, scales: list[float]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Re-fusion from a saved erasure's per-concept factors at per-concept ``scales``: (stage-A LoRA, stage-B LoRA)."""
    inputs = inputs_from_tensors(tensors, len(fusion["concepts"]), fusion.get("module_streams", {}))
    fused, _, _ = fuse(inputs, lam, lam_preserve, scales, fusion["mode"], fusion.get("null_space", 0.0),
                       fusion.get("preserve_growth", 0.0))
    stage_a = {k[len("stage_a."):]: v for k, v in tensors.items() if k.startswith("stage_a.")}
    return stage_a, pairs_to_state(fused, prefix)


def concept_scaled(erasure: Erasure, scales: dict[str, float]) -> Erasure:
    """``erasure`` with concept ``name``'s stage-B adapter at strength ``scales[name]`` (the others at 1), re-fused
    from its per-concept factors (``--multi fuse|sum``); a concept at 0 leaves the integration, so the result equals
    the fusion of the others. Stage A is one joint solve and is not scaled per concept."""

    fusion = erasure.manifest.get("fusion")
    if fusion is None or not erasure.fusion_state:
        raise TraceEraseError("this erasure has no per-concept adapters (made with --multi joint or for one "
                              "concept); per-concept scales need --multi fuse or sum")
    names = [c["name"] for c in fusion["concepts"]]
    lowered = {n.lower(): i for i, n in enumerate(names)}
    unknown = [n for n in scales if n.lower() not in lowered]
    if unknown:
        raise TraceEraseError(f"'{unknown[0]}' is not a concept of this erasure; choose from {', '.join(names)}")
    factors = [1.0] * len(names)
    for n, s in scales.items():
        factors[lowered[n.lower()]] = float(s)
    main, stage_b = combine_tensors(erasure.fusion_state, erasure.prefix, fusion, fusion["lambda"],
                                    fusion["lambda_preserve"], factors)
    manifest = {**erasure.manifest, "concept_scales": dict(zip(names, factors, strict=True))}
    if erasure.gated_state_dict is not None:
        return Erasure(main, manifest, gated_state_dict=stage_b, fusion_state=erasure.fusion_state)

    return Erasure(concat_loras([main, stage_b]) if main else stage_b, manifest,
                   fusion_state=erasure.fusion_state)
