"""Export an erasure to the formats users load: diffusers/PEFT, kohya (A1111, Forge, ComfyUI) and ``full`` weights.

Every module's delta is rebuilt densely (ΔW = Σ B·A at scale 1) and refactored by SVD at its numerical rank, so a
LoRA is never wider than it needs to be. A closed-form delta can be close to full rank (61–62 of 64 on toy-sd); where
a LoRA of that rank would be larger than the dense delta, the module is written as edited weights (``full``) in a
companion file — unless ``--max-rank`` truncates it, in which case the relative reconstruction error and the
certificate of the truncated delta are recorded. Provenance (method, concepts, base-model fingerprint, what was
exported at which rank and error) is in every file's safetensors ``__metadata__`` under ``trace_erase``.

A gated erasure (stage B active only for t < τ) cannot be expressed by any LoRA loader: it is refused, or exported
always-on with ``ungated=True``, which the file's metadata records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceEraseError
from ..io import atomic_write
from ..models.registry import adapter_class
from .erasure import Erasure
from .lora import delta_to_lora, lora_pairs
from .naming import kohya_modules

FORMATS = ("diffusers", "kohya", "full")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METADATA_KEY = "trace_erase"  # the provenance record in the safetensors __metadata__


@dataclass
class ExportOptions:
    """How to export: ``format``; ``max_rank`` (truncate LoRAs to this rank; None: the numerical rank, and dense
    weights where that is smaller); ``ungated`` (export a gated stage B always-on); ``precision`` of the tensors."""

    format: str = "diffusers"
    max_rank: int | None = None
    ungated: bool = False
    precision: str = "fp32"
    rank_tolerance: float = 1e-6

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise TraceEraseError(f"unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise TraceEraseError(f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if self.max_rank is not None and self.max_rank < 1:
            raise TraceEraseError(f"--max-rank must be ≥ 1 (got {self.max_rank})")
        if self.max_rank is not None and self.format == "full":
            raise TraceEraseError("--max-rank applies to LoRA formats; drop it for --format full")
        if not 0 <= self.rank_tolerance < 1:
            raise TraceEraseError(f"rank_tolerance must be in [0, 1) (got {self.rank_tolerance})")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """An export is one ``.safetensors`` file (plus ``-full.safetensors`` beside it when some modules are dense)."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise TraceEraseError(f"--output '{path}' must be a .safetensors file name")
    for p in (out, full_companion(out)):
        if p.exists() and not overwrite:
            raise TraceEraseError(f"'{p}' already exists; choose another --output or pass --overwrite")
    return out


def check_gate(gate: dict[str, Any] | None, options: ExportOptions) -> None:
    """Refuse to export a gated stage B (no LoRA loader has a timestep gate) unless ``options.ungated``."""
    if gate is not None and not options.ungated:
        raise TraceEraseError(
            f"this erasure's stage B is gated (active only for t < {gate['tau']} × the time range), which no LoRA "
            "loader can express; pass --ungated to export it always-on (recorded in the file), or use the erasure "
            "folder with `trace-erase generate`")


def full_companion(path: Path) -> Path:
    """Where modules exported as edited weights go when the main file is a LoRA."""
    return path.with_name(path.stem + "-full.safetensors")


@dataclass
class ModuleExport:
    """What one module became: a LoRA of ``rank`` (``a``: [r, in…], ``b``: [out, r…], scale 1) or dense weights."""

    kind: str  # "lora" | "full"
    rank: int
    numerical_rank: int
    rel_error: float
    lora_params: int
    dense_params: int
    a: torch.Tensor | None = field(default=None, repr=False)
    b: torch.Tensor | None = field(default=None, repr=False)
    delta: torch.Tensor | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "numerical_rank": self.numerical_rank,
                "rel_error": self.rel_error, "lora_params": self.lora_params, "dense_params": self.dense_params}


def _factors(erasure: Erasure, ungated: bool) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(A, B) pairs per module (denoiser-relative names) of the main LoRA and, when ``ungated``, the gated one."""
    states = [erasure.state_dict] + ([erasure.gated_state_dict] if ungated and erasure.gated_state_dict else [])
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for state in states:
        for name, pair in lora_pairs(state, erasure.prefix).items():
            out.setdefault(name, []).append(pair)
    return out


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


def plan_module(pairs: list[tuple[torch.Tensor, torch.Tensor]], options: ExportOptions) -> ModuleExport:
    """Decide how one module is exported and compute its factors (or dense delta) and reconstruction error."""
    delta = dense_delta(pairs)
    dense_params = delta.numel()
    if options.format == "full" and delta.dim() == 4:
        return ModuleExport("full", 0, 0, 0.0, 0, dense_params, delta=delta)
    if delta.dim() == 4:  # conv LoRA: kept as trained (already low rank), zero padding dropped
        a = torch.cat([p[0] for p in pairs]).double()
        b = torch.cat([p[1] for p in pairs], dim=1).double()
        keep = (a.flatten(1).abs().sum(1) > 0) & (b.flatten(2).abs().sum((0, 2)) > 0)
        a, b = a[keep], b[:, keep]
        r = a.shape[0]
        return ModuleExport("lora", r, r, 0.0, a.numel() + b.numel(), dense_params, a=a, b=b)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return ModuleExport("lora", 0, 0, 0.0, 0, dense_params, a=delta.new_zeros(0, delta.shape[1]),
                            b=delta.new_zeros(delta.shape[0], 0))
    numerical = int((s > options.rank_tolerance * s[0]).sum())
    per_rank = delta.shape[0] + delta.shape[1]
    if options.format == "full" or (options.max_rank is None and numerical * per_rank >= dense_params):
        return ModuleExport("full", 0, numerical, 0.0, numerical * per_rank, dense_params, delta=delta)
    r = min(numerical, options.max_rank or numerical)
    total = float((s**2).sum())
    error = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    a, b = delta_to_lora(delta, options.rank_tolerance)
    return ModuleExport("lora", r, numerical, error, r * per_rank, dense_params, a=a[:r], b=b[:, :r])


def _kohya_tensors(plans: dict[str, ModuleExport], family: str, handle: Any,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str]:
    """kohya keys (``lora_unet_…{.lora_down.weight,.lora_up.weight,.alpha}``), one α for all modules."""
    loras = {m: p for m, p in plans.items() if p.kind == "lora" and p.rank > 0}
    unet_config = getattr(handle.adapter.denoiser, "config", None)
    modules, naming = kohya_modules(family, list(loras), unet_config)
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for km in modules:
        present = [loras.get(m) for m in km.members]
        rank = max(p.rank for p in present if p is not None)
        downs, ups = [], []
        for member, p in zip(km.members, present, strict=True):
            if p is None:  # a fused member that was not trained: a zero block (sd-scripts drops q-less qkv)
                w = handle.adapter.module(member).weight
                ref = next(q for q in present if q is not None)
                downs.append(ref.a.new_zeros(rank, *ref.a.shape[1:]))
                ups.append(ref.b.new_zeros(w.shape[0], rank, *ref.b.shape[2:]))
                continue
            pad = rank - p.rank
            downs.append(torch.cat([p.a, p.a.new_zeros(pad, *p.a.shape[1:])]))
            ups.append(torch.cat([p.b, p.b.new_zeros(p.b.shape[0], pad, *p.b.shape[2:])], dim=1))
        down = torch.cat(downs)
        up = torch.zeros(sum(u.shape[0] for u in ups), down.shape[0], *ups[0].shape[2:], dtype=torch.float64)
        row = 0
        for j, u in enumerate(ups):  # block-diagonal: member j's rows read only member j's rank block
            up[row:row + u.shape[0], j * rank:(j + 1) * rank] = u
            row += u.shape[0]
        fused[km.name] = (down, up)
    # One alpha for the whole file, with each module's rank/alpha folded into lora_up (ΔW = up·down·α/r holds per
    # module): diffusers 0.42 loses per-module alphas of SD1 kohya files and mis-scales every module whose alpha
    # differs from the most common one; A1111, Forge and ComfyUI read per-module α/r and are exact either way.
    alpha = float(max((d.shape[0] for d, _ in fused.values()), default=1))
    out: dict[str, torch.Tensor] = {}
    for name, (down, up) in fused.items():
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = (up * (down.shape[0] / alpha)).to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out, naming


def _diffusers_tensors(plans: dict[str, ModuleExport], prefix: str,
                       dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT keys (``{prefix}.{module}.lora_A/B.weight``) at each module's own rank, and the LoraConfig for them."""
    loras = {m: p for m, p in plans.items() if p.kind == "lora" and p.rank > 0}
    out: dict[str, torch.Tensor] = {}
    for m, p in loras.items():
        out[f"{prefix}.{m}.lora_A.weight"] = p.a.to(dtype).contiguous()
        out[f"{prefix}.{m}.lora_B.weight"] = p.b.to(dtype).contiguous()
    top = max((p.rank for p in loras.values()), default=1)
    ranks = {m: p.rank for m, p in loras.items()}
    config = {"r": top, "lora_alpha": top, "target_modules": sorted(loras),
              # exact module names (peft matches pattern keys as regexes against the end of a module's name)
              "rank_pattern": {f"^{m}$".replace(".", r"\."): r for m, r in ranks.items() if r != top},
              "alpha_pattern": {f"^{m}$".replace(".", r"\."): r for m, r in ranks.items() if r != top},
              "init_lora_weights": False}
    return out, {f"{prefix}.{k}": v for k, v in config.items()}


def _full_tensors(plans: dict[str, ModuleExport], handle: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The edited weights W + ΔW of every dense module, keyed as in the denoiser's own state dict."""
    out = {}
    for m, p in plans.items():
        if p.kind == "full":
            w = handle.adapter.module(m).weight.detach().double().cpu()
            out[f"{m}.weight"] = (w + p.delta).to(dtype).contiguous()
    return out


def provenance(erasure: Erasure) -> dict[str, Any]:
    """What the exported file came from: method, concepts, the base model's identity, the gate if any."""
    m = erasure.manifest
    base = m["base_model"]
    return {"method": m["method"], "concepts": m["concepts"],
            "base_model": {"source": base["source"], "family": base["family"],
                           "pipeline_class": base.get("pipeline_class"), "sha256": base["fingerprint"]["sha256"]},
            "gate": m.get("gate"), "created": m.get("created"), "versions": m.get("versions")}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write(path, save(tensors, metadata=metadata))


Certifier = Callable[[Erasure, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, dict[str, Any]]]


def write_export(erasure: Erasure, handle: Any, options: ExportOptions, output: str | Path,
                 overwrite: bool = False, certify: Certifier | None = None) -> dict[str, Any]:
    """Write ``erasure`` as ``options.format`` to ``output`` (a ``.safetensors`` file) for the base model in
    ``handle``; returns the export record (also stored in each file's metadata). Where a closed-form delta is
    truncated, ``certify(erasure, handle, exported, exact)`` (dense deltas per module) gives the certificate of the
    exported delta next to the exact one (:func:`trace_erase.api.export_erasure` passes the closed-form engine's)."""
    out = check_output(output, overwrite)
    family = erasure.manifest["base_model"]["family"]
    check_gate(erasure.manifest.get("gate"), options)
    erasure.check_base(handle)
    dtype = PRECISIONS[options.precision]
    factors = _factors(erasure, options.ungated)
    plans = {m: plan_module(pairs, options) for m, pairs in factors.items()}
    record: dict[str, Any] = {"format": options.format, "precision": options.precision, "max_rank": options.max_rank,
                              "ungated": bool(options.ungated and erasure.gated_state_dict is not None),
                              "modules": {m: p.record() for m, p in plans.items()}}
    truncated = any(p.kind == "lora" and p.rank < p.numerical_rank for p in plans.values())
    if truncated and certify is not None and erasure.manifest["config"].get("closed_form") and erasure.certificate:
        exact = {m: dense_delta(pairs) for m, pairs in factors.items()}
        exported = {m: p.delta if p.kind == "full" else p.b @ p.a for m, p in plans.items()}
        record["certificate"] = certify(erasure, handle, exported, exact)
    full = _full_tensors(plans, handle, dtype)
    meta_base = {"format": "pt", "modelspec.architecture": family,
                 "ss_base_model_version": adapter_class(family).export_base_version}
    files: dict[str, dict[str, Any]] = {}
    if options.format == "full":
        files[out.name] = {"kind": "full", "tensors": len(full), "bytes": _nbytes(full)}
        record["files"] = files
        meta = {**meta_base, METADATA_KEY: json.dumps({**provenance(erasure), "export": record})}
        _save(out, full, meta)
        return record
    if full:
        files[full_companion(out).name] = {"kind": "full", "tensors": len(full), "bytes": _nbytes(full)}
    if options.format == "kohya":
        tensors, naming = _kohya_tensors(plans, family, handle, dtype)
        record["naming"] = naming
    else:
        tensors, lora_config = _diffusers_tensors(plans, erasure.prefix, dtype)
    if not tensors:
        raise TraceEraseError("no module of this erasure is low-rank enough for a LoRA file; pass --max-rank R "
                              "to truncate, or --format full")
    if options.format == "kohya":
        extra = {"ss_network_module": "networks.lora",
                 "ss_network_dim": str(max(v.shape[0] for k, v in tensors.items() if k.endswith("down.weight"))),
                 "ss_network_alpha": str(next(float(v) for k, v in tensors.items() if k.endswith(".alpha")))}
    else:
        extra = {"lora_adapter_metadata": json.dumps(lora_config, sort_keys=True)}
    files = {out.name: {"kind": options.format, "tensors": len(tensors), "bytes": _nbytes(tensors)}, **files}
    record["files"] = files
    meta = {**meta_base, **extra, METADATA_KEY: json.dumps({**provenance(erasure), "export": record})}
    if full:
        _save(full_companion(out), full, {**meta_base, METADATA_KEY: meta[METADATA_KEY]})
    _save(out, tensors, meta)
    return record


def read_export_record(path: str | Path) -> dict[str, Any]:
    """The provenance and export record in an exported file's metadata (for ``trace-erase info FILE``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise TraceEraseError(f"'{path}' is not a readable safetensors file ({type(exc).__name__})") from exc
    if METADATA_KEY not in meta:
        raise TraceEraseError(f"'{path}' was not exported by trace-erase (no '{METADATA_KEY}' metadata)")
    return json.loads(meta[METADATA_KEY])


def apply_full(target: Any, path: str | Path) -> None:
    """Load a ``full`` export's edited weights into a pipeline's denoiser (in place: use a fresh pipeline)."""
    from safetensors.torch import load_file

    from ..models.loading import pipe_and_adapter

    _, adapter = pipe_and_adapter(target)
    weights = load_file(str(path))
    own = adapter.denoiser.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise TraceEraseError(f"'{path}' holds weights the model does not have ({unknown[0]}); "
                              "apply it to the base model it was exported for")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].dtype))
