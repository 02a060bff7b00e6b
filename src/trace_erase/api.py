"""The Python API: ``erase(pipe, concepts=[...], method=...)`` → :class:`Erasure` (``.save``, ``.apply``)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from .artifacts.erasure import GATED_WEIGHT_NAME, LORA_WEIGHT_NAME, Erasure
from .artifacts.export import ExportOptions, write_export
from .artifacts.fingerprint import fingerprint
from .artifacts.lora import concat_loras, deltas_to_state_dict
from .artifacts.manifest import FORMAT, FORMAT_VERSION
from .config import Concept, config_from_dict, make_concepts
from .engines.advunlearn import TextEncoderEngine
from .engines.bank import check_bank
from .engines.closed_form import ClosedFormConfig, ClosedFormEngine
from .engines.export_stats import ExportStatistics
from .engines.fusion import fusion_tensors
from .engines.preimage import check_preimage
from .engines.stage_a import StageAWeights
from .engines.trajectory import TrajectoryConfig, TrajectoryEngine
from .errors import TraceEraseError
from .methods import MethodSpec, get_method
from .models import FamilyAdapter, ModelHandle, get_adapter
from .models.text_lora import split_qualified
from .multi import combine, fusion_inputs, resolve_multi, train_per_concept


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("trace-erase", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_memory_mb() -> dict[str, float]:
    """Process peak resident memory (and CUDA peak allocation when a GPU is used), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def runtime_record(target: Any, adapter: FamilyAdapter) -> dict[str, Any]:
    """Device, dtype and offload the run used (a handle's full runtime setting, else what the denoiser is on)."""
    if isinstance(target, ModelHandle):
        return target.runtime.describe()
    return {"device": str(adapter.device), "dtype": str(adapter.dtype).removeprefix("torch."), "offload": "none"}


def _summary(cert: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("erasure_residual", "erasure_residual_before", "collateral_preserve", "collateral_probe"):
        vals = [c[key] for c in cert.values() if c.get(key) is not None]
        out[f"{key}_max"] = max(vals) if vals else None
        out[f"{key}_mean"] = sum(vals) / len(vals) if vals else None
    return out


# options both engines read, set once for both (any other key both define goes to stage A, as it always has)
SHARED_OPTIONS = frozenset({"attribute_contexts"})


def method_configs(spec: MethodSpec, options: dict[str, Any], family: str | None = None
                   ) -> tuple[ClosedFormConfig | None, TrajectoryConfig | None]:
    """Route each option to the engine that owns it and build both typed configs (errors name the valid keys), and
    refuse the combinations the method or the model ``family`` (None: not known yet) cannot run."""
    cf_keys = {f.name for f in dataclasses.fields(ClosedFormConfig)}
    tr_keys = set(TrajectoryConfig.option_keys())

    def route(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        cf_part, tr_part = {}, {}
        for key, value in opts.items():
            known = False
            if key in cf_keys and spec.uses_closed_form:
                cf_part[key], known = value, True
            if key in tr_keys and spec.uses_trajectory and (not known or key in SHARED_OPTIONS):
                tr_part[key], known = value, True
            if not known:
                valid = sorted((cf_keys if spec.uses_closed_form else set())
                               | (tr_keys if spec.uses_trajectory else set()))
                raise TraceEraseError(f"unknown options for '{spec.name}' ['{key}']; valid keys: {', '.join(valid)}")
        return cf_part, tr_part

    cf_opts, tr_opts = route(options)
    cf_kind, tr_kind = route(spec.kind_options(family))
    cf = config_from_dict(ClosedFormConfig, {**spec.defaults, **cf_kind, **cf_opts}, f"options for '{spec.name}'") \
        if spec.uses_closed_form else None
    several = tr_opts.get("multi") is not None  # erase() sets it only for two concepts or more
    base = {**spec.trajectory, **tr_kind, **(spec.multi_trajectory if several else {})}
    tr = config_from_dict(TrajectoryConfig, {**base, **tr_opts}, f"options for '{spec.name}'") \
        if spec.uses_trajectory else None
    check_preimage(tr, family, stage_a=spec.uses_closed_form)
    if tr is not None and tr.stage_b_base == "original":
        if not spec.uses_closed_form:
            raise TraceEraseError(f"stage_b_base=original trains stage B beside stage A; '{spec.name}' has no stage A, "
                                  "so drop the option")
        if tr.preimage is not None:
            raise TraceEraseError("the preimage branch trains through stage A's edit; with stage_b_base=original "
                                  "stage A is off while stage B trains — drop one of them")
    check_bank(tr, stage_a=spec.uses_closed_form)
    return cf, tr


def erase(
    pipe: Any,
    concepts: list[str | Concept | dict[str, Any]],
    method: str = "trace-closed-form",
    anchor: str | None = None,
    preserve: list[str] | None = None,
    model_id: str | None = None,
    progress: bool = True,
    workdir: str | Path | None = None,
    multi: str | None = None,
    **options: Any,
) -> Erasure:
    """Erase ``concepts`` from ``pipe`` (a diffusers pipeline or a :class:`ModelHandle`) with ``method``.

    ``options`` are engine options (the YAML keys; see ``trace-erase erase --help``). ``workdir`` holds stage-B
    checkpoints so an interrupted run resumes. ``multi`` (several concepts, methods with stage B): ``fuse`` (one
    stage-B LoRA per concept, then closed-form integration), ``sum`` or ``joint`` (one LoRA for all).
    The pipeline's weights are the same afterwards; the result is an
    :class:`Erasure` to ``.save(dir)`` or ``.apply(pipe, scale)``.
    """
    start = time.perf_counter()
    if isinstance(pipe, ModelHandle):
        adapter, source = pipe.adapter, model_id or pipe.source
    else:
        adapter = get_adapter(pipe)
        source = model_id or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "in-memory"
    spec = get_method(method)
    spec.check_family(adapter.family)
    concept_list = make_concepts(concepts, anchor=anchor, preserve=preserve)
    mode = resolve_multi(spec, multi if multi is not None else options.get("multi"), len(concept_list))
    options = {k: v for k, v in options.items() if k != "multi"}
    if spec.uses_trajectory:
        options["multi"] = mode if mode != "single" else None
    cf_cfg, tr_cfg = method_configs(spec, options, adapter.family)

    # built before stage A runs: it refuses a dtype/device it cannot train in
    run_config = {"method": spec.name, "closed_form": cf_cfg.run_settings() if cf_cfg else None,
                  "base_sha256": None}
    engine_class = TextEncoderEngine if tr_cfg is not None and tr_cfg.trains_text_encoder else TrajectoryEngine
    tr_engine = engine_class(adapter, tr_cfg, progress=progress, workdir=workdir,
                             run_config=run_config) if tr_cfg else None
    run = _Run(mode=mode)
    concept_stats = None
    if cf_cfg is not None:
        cf_engine = ClosedFormEngine(adapter, cf_cfg, progress=progress)
        if mode == "fuse" and tr_engine is not None:  # one encoding pass serves stage A and the fusion
            concept_stats = cf_engine.gather(concept_list, per_concept=True)
            run.stage_a = cf_engine.run(concept_list, stats=concept_stats[1])
        else:
            run.stage_a = cf_engine.run(concept_list)
    deltas = run.stage_a.deltas if run.stage_a is not None else {}
    run.modules = list(dict.fromkeys([*deltas, *(tr_engine.targets if tr_engine else [])]))
    run.fingerprint = fingerprint(adapter, run.modules)
    if deltas:
        run.parts["closed_form"], run.ranks = deltas_to_state_dict(deltas, adapter.denoiser_name,
                                                                   cf_cfg.rank_tolerance)
    if tr_engine is not None:
        tr_engine.run_config["base_sha256"] = run.fingerprint["sha256"]
        _stage_b(run, adapter, tr_engine, cf_cfg, with_neighbours(concept_list, run.stage_a), deltas, concept_stats,
                 workdir, progress)
    gate_tau = tr_cfg.gate_tau if tr_cfg else None
    gated = run.parts.pop("trajectory") if gate_tau is not None else None
    main_state = concat_loras(list(run.parts.values())) if run.parts else {}
    manifest = _manifest(run, spec, cf_cfg, tr_cfg, concept_list, str(source), adapter, main_state, gated,
                         runtime_record(pipe, adapter), time.perf_counter() - start)
    return Erasure(main_state, manifest, gated_state_dict=gated, fusion_state=run.fusion_state or None)


def with_neighbours(concepts: list[Concept], stage_a: Any) -> list[Concept]:
    """The concepts with the neighbours stage A found added to their preserve prompts (stage B's L_pres, with
    rho > 0, then keeps them too); unchanged when none were found."""
    found = list((stage_a.neighbours or {}).get("preserved", {})) if stage_a is not None else []
    return [dataclasses.replace(c, preserve=[*c.preserve, *found]) for c in concepts] if found else concepts


@dataclasses.dataclass
class _Run:
    """What one erasure produced, on its way into the Erasure and its manifest."""

    mode: str
    stage_a: Any = None  # the closed-form engine's result
    modules: list[str] = dataclasses.field(default_factory=list)
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    parts: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)  # LoRA per stage
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    stage_b_log: dict[str, Any] = dataclasses.field(default_factory=dict)
    fusion: dict[str, Any] | None = None
    fusion_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _stage_b(run: _Run, adapter: FamilyAdapter, engine: TrajectoryEngine, cf_cfg: ClosedFormConfig | None,
             concepts: list[Concept], deltas: dict[str, torch.Tensor], concept_stats: Any,
             workdir: str | Path | None, progress: bool) -> None:
    """Stage B on top of stage A's deltas: one LoRA for all concepts, or one per concept then combined
    (``fuse``/``sum``, with what apply-time re-fusion needs kept in ``run.fusion_state``)."""
    stage_a = StageAWeights(adapter, deltas) if deltas else None
    # stage_b_base=original: stage B trains on θ0, as if there were no stage A (the fusion still reads θ*)
    base = stage_a if engine.config.stage_b_base == "stage-a" else None
    if run.mode in ("fuse", "sum"):
        states, run.stage_b_log = train_per_concept(adapter, engine.config, concepts, base,
                                                    Path(workdir) if workdir else None, engine.run_config, progress)
        stats_cfg = cf_cfg or config_from_dict(ClosedFormConfig, get_method("trace").defaults)
        inputs = fusion_inputs(adapter, concepts, states, stats_cfg, run.mode, concept_stats,
                               engine.config.fusion.null_space, engine.config.fusion.observed, stage_a)
        run.parts["trajectory"], run.fusion = combine(adapter, inputs, engine.config, run.mode, deltas, concepts)
        run.fusion_state = fusion_tensors(inputs)
        if "closed_form" in run.parts:  # apply-time re-fusion (per-concept scales) rebuilds the whole LoRA
            run.fusion_state.update({f"stage_a.{k}": v for k, v in run.parts["closed_form"].items()})
        return
    engine.stage_a = base
    with base.applied() if base else contextlib.nullcontext():
        run.stage_b_log = engine.train(concepts)
    run.parts["trajectory"] = run.stage_b_log.pop("state_dict")


def _manifest(run: _Run, spec: MethodSpec, cf_cfg: ClosedFormConfig | None, tr_cfg: TrajectoryConfig | None,
              concepts: list[Concept], source: str, adapter: FamilyAdapter, main_state: dict[str, torch.Tensor],
              gated: dict[str, torch.Tensor] | None, runtime: dict[str, Any], wall: float) -> dict[str, Any]:
    """``erasure.json``: what was erased, how, from which base model, with what result, and at what cost."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        # text-encoder modules need format 4 to be read; without them, format 3 keeps older readers reading it
        "format_version": FORMAT_VERSION if any(split_qualified(m)[0] for m in run.modules) else 3,
        "method": spec.name,
        "engine": spec.engine,
        "config": {
            "closed_form": dataclasses.asdict(cf_cfg) if cf_cfg else None,
            "trajectory": dataclasses.asdict(tr_cfg) if tr_cfg else None,  # nested sub-configs since format 3
        },
        "concepts": [dataclasses.asdict(c) for c in concepts],
        "base_model": {"source": source, **adapter.describe(), "fingerprint": run.fingerprint},
        "lora": {
            "weight_name": LORA_WEIGHT_NAME,
            "prefix": adapter.denoiser_name,
            "target_modules": run.modules,
            "parts": list(run.parts),
            "rank": int(next(iter(main_state.values())).shape[0]) if main_state else 0,
            "closed_form_numerical_ranks": run.ranks,
        },
        "gate": None if gated is None else {
            "tau": tr_cfg.gate_tau,
            "weight_name": GATED_WEIGHT_NAME,
            "time_kind": adapter.time_kind,
            "time_scale": adapter.time_scale,
            "rule": "gated LoRA active only while model time < tau × time_scale",
        },
        "runtime": runtime,
        "timings": {"wall_time_s": wall},
        "memory": peak_memory_mb(),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    cf_result, tr_log = run.stage_a, run.stage_b_log
    if cf_result is not None:
        manifest["streams"] = cf_result.streams
        manifest["rows"] = cf_result.counts
        manifest["certificate"] = {"summary": _summary(cf_result.certificate), "per_module": cf_result.certificate}
        manifest["timings"].update({f"stage_a_{k}": v for k, v in cf_result.timings.items()})
        if cf_result.rece:
            manifest["certificate"]["rece_recovered"] = cf_result.rece
        if cf_result.neighbours is not None:
            manifest["neighbours"] = cf_result.neighbours
    if tr_log:
        manifest["trajectory_log"] = {"final_losses": tr_log["final_losses"], "steps": tr_log["steps"],
                                      **{k: tr_log[k] for k in ("resumed", "other_processes", "adversarial_losses",
                                                               "bank_search", "attention_fallback")
                                         if tr_log.get(k)}}
        manifest["timings"]["stage_b_s"] = tr_log["train_seconds"]
        if tr_log.get("resumed_train_seconds"):  # per-concept LoRAs reloaded, not trained now: what they took
            manifest["timings"]["stage_b_resumed_s"] = tr_log["resumed_train_seconds"]
    manifest["multi"] = run.mode
    if run.fusion is not None:
        manifest["fusion"] = run.fusion
    return manifest


def export_erasure(erasure: Erasure, handle: ModelHandle, options: ExportOptions, output: str | Path,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write ``erasure`` as a file other tools load (``options.target``: comfyui, a1111, forge, invokeai, kohya or
    diffusers; or ``options.format``: kohya, diffusers or full) for the base model in ``handle``; a truncated
    closed-form delta is cut in the solve's own Gram metric (``options.truncation``) and carries its certificate
    next to the exact one. Returns the export record (also stored in the file's metadata)."""
    stats = ExportStatistics(erasure, handle)  # encodes the prompts only if a truncation needs them
    return write_export(erasure, handle, options, output, overwrite=overwrite, certify=stats.certify,
                        metric=stats.metrics)
