"""Export an erasure to the formats users load: diffusers/PEFT, kohya (A1111, Forge, ComfyUI, sd-scripts) and
``full`` weights — for a named tool with ``target`` (see :mod:`.targets`), or in a named ``format``.

Every module's delta is rebuilt densely (ΔW = Σ B·A at scale 1) and refactored at its numerical rank, so a LoRA is
never wider than it needs to be. ``max_rank`` truncates it (Gram-weighted by default, :mod:`.lowrank`), recording
each module's error and the closed-form certificate of the truncated delta. Without a target, a module whose exact
LoRA would be larger than its dense delta is written as edited weights in a ``-full`` companion file; with a target
every module the target's readers can load stays in the LoRA, and only modules no LoRA of the format can carry for
them go to the companion file (or are refused with ``strict``). Provenance (method, concepts, base-model
fingerprint, what was exported at which rank and error, what each known reader loads) is in every file's
safetensors ``__metadata__`` under ``trace_erase``.

A gated erasure (stage B active only for t < τ) cannot be expressed by any LoRA loader: it is refused, or exported
always-on with ``ungated=True``, which the file's metadata records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceEraseError
from ..io import atomic_write
from ..models.registry import adapter_class
from ..models.text_lora import ROOT, canonical_name, clip_encoders, lora_key, split_qualified
from .erasure import Erasure
from .lora import module_pairs
from .lowrank import TRUNCATIONS, Metric, ModuleExport, dense_delta, plan_module
from .naming import kohya_modules
from .readers import file_modules
from .targets import TARGETS, Placement, check_target, companion_instructions, place, verdicts

FORMATS = ("diffusers", "kohya", "full")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METADATA_KEY = "trace_erase"  # the provenance record in the safetensors __metadata__
__all__ = ["ExportOptions", "ModuleExport", "apply_full", "check_gate", "check_output", "dense_delta",
           "full_companion", "read_export_record", "read_keys", "write_export"]


@dataclass
class ExportOptions:
    """How to export: ``target`` (a tool: picks format and placement) or ``format``; ``strict`` (refuse a module a
    target's reader cannot load instead of writing a companion file); ``max_rank`` (truncate LoRAs to this rank;
    None: the numerical rank); ``truncation`` (``gram`` or ``svd``); ``ungated`` (export a gated stage B always-on);
    ``precision`` of the tensors."""

    format: str | None = None
    max_rank: int | None = None
    ungated: bool = False
    precision: str = "fp32"
    rank_tolerance: float = 1e-6
    target: str | None = None
    strict: bool = False
    truncation: str = "gram"

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.target is not None and self.format is not None:
            raise TraceEraseError(f"--target {self.target} picks the format; drop --format {self.format}")
        if self.target is None:
            self.format = self.format or "diffusers"
            if self.strict:
                raise TraceEraseError("--strict needs --target (the readers it checks against)")
        if self.format is not None and self.format not in FORMATS:
            raise TraceEraseError(f"unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise TraceEraseError(f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}")
        if self.max_rank is not None and self.max_rank < 1:
            raise TraceEraseError(f"--max-rank must be ≥ 1 (got {self.max_rank})")
        if self.max_rank is not None and self.format == "full":
            raise TraceEraseError("--max-rank applies to LoRA formats; drop it for --format full")
        if self.truncation not in TRUNCATIONS:
            raise TraceEraseError(f"unknown --truncation '{self.truncation}'; choose one of {', '.join(TRUNCATIONS)}")
        if not 0 <= self.rank_tolerance < 1:
            raise TraceEraseError(f"rank_tolerance must be in [0, 1) (got {self.rank_tolerance})")

    @property
    def name(self) -> str:
        """What the export is for, in file names: the target, else the format."""
        return self.target or self.format


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
    """PEFT keys (``{prefix}.{module}.lora_A/B.weight``; a text-encoder module under its qualified name) at each
    module's own rank, and the LoraConfig for each component."""
    loras = {m: p for m, p in plans.items() if p.kind == "lora" and p.rank > 0}
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, int]] = {}  # component → {module name as its LoraConfig names it: rank}
    for m, p in loras.items():
        out[f"{lora_key(m, prefix)}.lora_A.weight"] = p.a.to(dtype).contiguous()
        out[f"{lora_key(m, prefix)}.lora_B.weight"] = p.b.to(dtype).contiguous()
        component, name = split_qualified(m)
        if component is None:  # exact module names (peft matches pattern keys as regexes against a name's end)
            groups.setdefault(prefix, {})[m] = p.rank
        else:  # without the CLIP root, which transformers 5 flattens away on CLIPTextModel: matches either way
            groups.setdefault(component, {})[name.removeprefix(ROOT)] = p.rank
    metadata: dict[str, Any] = {}
    for component, ranks in groups.items():
        top = max(ranks.values())
        pattern = (lambda m: f"^{m}$".replace(".", r"\.")) if component == prefix else re.escape
        config = {"r": top, "lora_alpha": top, "target_modules": sorted(ranks),
                  "rank_pattern": {pattern(m): r for m, r in ranks.items() if r != top},
                  "alpha_pattern": {pattern(m): r for m, r in ranks.items() if r != top},
                  "init_lora_weights": False}
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return out, metadata


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
MetricSource = Callable[[Erasure, Any], dict[str, Metric]]  # per module: its text stream's G and columns


def _factors(erasure: Erasure, ungated: bool) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(A, B) pairs per module (denoiser-relative names, qualified text-encoder names) of the main LoRA and, when
    ``ungated``, the gated one."""
    states = [erasure.state_dict] + ([erasure.gated_state_dict] if ungated and erasure.gated_state_dict else [])
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for state in states:
        for name, pair in module_pairs(state, erasure.prefix).items():
            out.setdefault(name, []).append(pair)
    return out


def _file_names(plans: dict[str, ModuleExport], fmt: str, family: str, handle: Any,
                prefix: str) -> dict[str, tuple[str, ...]]:
    """Module name in the file → the exported denoiser modules it carries (several for a fused kohya module)."""
    loras = [m for m, p in plans.items() if p.kind == "lora" and p.rank > 0]
    if fmt == "kohya":
        modules, _ = kohya_modules(family, loras, getattr(handle.adapter.denoiser, "config", None))
        return {km.name: tuple(m for m in km.members if m in loras) for km in modules}
    return {lora_key(m, prefix): (m,) for m in loras}


def _apply_target(plans: dict[str, ModuleExport], factors: dict[str, list], options: ExportOptions, family: str,
                  handle: Any, prefix: str) -> Placement:
    """Place every module for ``options.target``; modules no reader-loadable LoRA can carry become edited weights."""
    target = TARGETS[options.target]
    fmt = target.format_for(family)
    head = prefix + "."

    def to_module(name: str) -> str | None:
        return name[len(head):] if fmt == "diffusers" and name.startswith(head) else None

    placement = place(target, family, _file_names(plans, fmt, family, handle, prefix), options.strict, to_module)
    for m in placement.companion:
        p = plans[m]
        plans[m] = ModuleExport("full", 0, p.numerical_rank, 0.0, p.lora_params, p.dense_params,
                                delta=dense_delta(factors[m]))
    return placement


def _placeholder(handle: Any, module: str) -> ModuleExport:
    """A zero rank-1 LoRA on ``module``: changes nothing, makes a reader recognise the file."""
    w = handle.adapter.module(module).weight
    zero_a, zero_b = torch.zeros(1, w.shape[1], dtype=torch.float64), torch.zeros(w.shape[0], 1, dtype=torch.float64)
    return ModuleExport("lora", 1, 0, 0.0, w.shape[0] + w.shape[1], w.numel(), a=zero_a, b=zero_b)


def _dense_instructions(companion: str, modules: list[str], lora: str) -> str:
    return (f"{len(modules)} module(s) are smaller as edited weights than as an exact LoRA and are in {companion}, "
            f"which LoRA loaders do not read: load it into the base model first (`trace_erase.artifacts.export."
            f"apply_full(pipe, '{companion}')`) and apply {lora} to that model — or export with --max-rank R or "
            "--target TOOL for a file that holds every module")


def write_export(erasure: Erasure, handle: Any, options: ExportOptions, output: str | Path,
                 overwrite: bool = False, certify: Certifier | None = None,
                 metric: MetricSource | None = None) -> dict[str, Any]:
    """Write ``erasure`` for ``options.target`` (or as ``options.format``) to ``output`` (a ``.safetensors`` file)
    for the base model in ``handle``; returns the export record (also stored in each file's metadata). Where a
    closed-form delta is truncated, ``metric(erasure, handle)`` gives the Gram of each text stream for the ``gram``
    truncation and ``certify(erasure, handle, exported, exact)`` (dense deltas per module) the certificate of the
    exported delta next to the exact one (:func:`trace_erase.api.export_erasure` passes the closed-form engine's)."""
    out = check_output(output, overwrite)
    family = erasure.manifest["base_model"]["family"]
    check_gate(erasure.manifest.get("gate"), options)
    fmt = TARGETS[options.target].format_for(family) if options.target else options.format
    erasure.check_base(handle)
    dtype = PRECISIONS[options.precision]
    factors = _factors(erasure, options.ungated)
    closed_form = bool(erasure.manifest["config"].get("closed_form"))
    wants_metric = metric is not None and closed_form and options.max_rank and options.truncation == "gram"
    metrics = metric(erasure, handle) if wants_metric else {}
    plans = {m: plan_module(pairs, fmt, options.max_rank, options.rank_tolerance, options.target is None,
                            options.truncation, metrics.get(m)) for m, pairs in factors.items()}
    placement = _apply_target(plans, factors, options, family, handle, erasure.prefix) if options.target else None
    record: dict[str, Any] = {"format": fmt, "target": options.target, "strict": options.strict,
                              "precision": options.precision, "max_rank": options.max_rank,
                              "truncation": options.truncation if options.max_rank else None,
                              "ungated": bool(options.ungated and erasure.gated_state_dict is not None),
                              "modules": {m: p.record() for m, p in plans.items()}}
    truncated = any(p.kind == "lora" and p.rank < p.numerical_rank for p in plans.values())
    if truncated and certify is not None and closed_form and erasure.certificate:
        exact = {m: dense_delta(pairs) for m, pairs in factors.items()}
        record["certificate"] = certify(erasure, handle, {m: p.exported() for m, p in plans.items()}, exact)
    full = _full_tensors(plans, handle, dtype)
    meta_base = {"format": "pt", "modelspec.architecture": family,
                 "ss_base_model_version": adapter_class(family).export_base_version}
    files: dict[str, dict[str, Any]] = {}
    if fmt == "full":
        files[out.name] = {"kind": "full", "tensors": len(full), "bytes": _nbytes(full)}
        record["files"] = files
        meta = {**meta_base, METADATA_KEY: json.dumps({**provenance(erasure), "export": record})}
        _save(out, full, meta)
        return record
    placeholders = {m: _placeholder(handle, m) for m in (placement.placeholders if placement else [])}
    if fmt == "kohya":
        tensors, naming = _kohya_tensors(plans, family, handle, dtype)
        record["naming"] = naming
    else:
        tensors, lora_config = _diffusers_tensors({**plans, **placeholders}, erasure.prefix, dtype)
    if not tensors:
        raise TraceEraseError("no module of this erasure is low-rank enough for a LoRA file; pass --max-rank R "
                              "to truncate, or --format full")
    record["readers"] = verdicts(family, fmt, file_modules(list(tensors))[1])
    if placement is not None:
        keys = {r.key for r in placement.readers}
        short = [v for v in record["readers"] if v["reader"] in keys and v["status"] != "whole"]
        if short:  # the placement guarantees this; a failure here is a bug in the reader table or the exporter
            raise TraceEraseError(f"internal error: the export would not load whole ({short[0]['line']}); "
                                  "please report it, and use --target diffusers meanwhile")
        record["placeholders"] = sorted(placeholders)
    companion = full_companion(out)
    if full:
        files[companion.name] = {"kind": "full", "tensors": len(full), "bytes": _nbytes(full)}
        mods = {m: [] for m, p in plans.items() if p.kind == "full"}
        text = companion_instructions(companion.name, placement.companion, out.name) if placement else \
            _dense_instructions(companion.name, list(mods), out.name)
        record["companion"] = {"file": companion.name, "modules": placement.companion if placement else mods,
                               "instructions": text}
    if fmt == "kohya":
        extra = {"ss_network_module": "networks.lora",
                 "ss_network_dim": str(max(v.shape[0] for k, v in tensors.items() if k.endswith("down.weight"))),
                 "ss_network_alpha": str(next(float(v) for k, v in tensors.items() if k.endswith(".alpha")))}
    else:
        extra = {"lora_adapter_metadata": json.dumps(lora_config, sort_keys=True)}
    record["files"] = {out.name: {"kind": fmt, "tensors": len(tensors), "bytes": _nbytes(tensors)}, **files}
    meta = {**meta_base, **extra, METADATA_KEY: json.dumps({**provenance(erasure), "export": record})}
    if full:
        _save(companion, full, {**meta_base, METADATA_KEY: meta[METADATA_KEY]})
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


def read_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file (without loading the tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def apply_full(target: Any, path: str | Path) -> None:
    """Load a ``full`` export's edited weights into a pipeline's denoiser, and its text encoders' (keys under the
    component's name, ``text_encoder.text_model.…``), in place: use a fresh pipeline."""
    from safetensors.torch import load_file

    from ..models.loading import pipe_and_adapter

    pipe, adapter = pipe_and_adapter(target)
    weights = load_file(str(path))
    own = {k: v for k, v in adapter.denoiser.state_dict().items()}
    for component, encoder in clip_encoders(pipe).items():
        own.update({f"{component}.{canonical_name(encoder, k)}": v for k, v in encoder.state_dict().items()})
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise TraceEraseError(f"'{path}' holds weights the model does not have ({unknown[0]}); "
                              "apply it to the base model it was exported for")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].dtype))
