"""Side-by-side benchmark: every method erases every concept on the same seeds; one table of means per method."""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.erasure import remove_erasures
from ..errors import TraceEraseError
from ..evaluation.intervals import units
from ..evaluation.metrics import columns
from ..evaluation.run import evaluate, images_for
from ..evaluation.scorers import Scorer, ScorerOptions, scorer_for
from ..evaluation.suites import Suite, build_suite
from ..io import atomic_write, check_writable, commit_folder, file_label, prepare_workdir, run_folder
from ..methods import get_method
from ..models import ModelHandle
from .tables import summarize, write_tables


def parse_sweep(text: str | None) -> list[dict[str, Any]]:
    """Extra ``trace`` runs, one options dict each: ``tau=0.3,0.5`` → [{tau: 0.3}, {tau: 0.5}] (a bare value reuses
    the previous key); ``+`` joins options of one run: ``adversarial_every=25+adversarial_tokens=1,3`` →
    [{adversarial_every: 25, adversarial_tokens: 1}, {adversarial_every: 25, adversarial_tokens: 3}]. Integers
    stay integers; true/false are switches; any other value that is not a number stays text (``reference=original``)."""
    if not text:
        return []
    if "=" not in text.split(",")[0]:
        raise TraceEraseError(f"--sweep '{text}' must look like tau=0.3,0.5,0.7 or reference=original")

    def value(v: str) -> Any:
        for kind in (int, float):  # "25" stays an integer: integer options refuse 25.0
            try:
                return kind(v)
            except ValueError:
                pass
        flag = {"true": True, "false": False}.get(v.strip().lower())  # switches, as the CLI's --option reads them
        return v.strip() if flag is None else flag

    runs: list[dict[str, Any]] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if "=" not in item:  # another value of the previous run's last key
            last = dict(runs[-1])
            last[list(last)[-1]] = value(item)
            runs.append(last)
            continue
        run = {}
        for part in item.split("+"):
            key, _, v = part.partition("=")
            if not key.strip() or not v.strip():
                raise TraceEraseError(f"--sweep '{text}': '{part}' must look like key=value")
            run[key.strip()] = value(v)
        runs.append(run)
    return runs


def _reset(handle: ModelHandle) -> None:
    """Remove every adapter (and gate) an earlier run loaded, so each method starts from the base model."""
    remove_erasures(handle)
    if handle.pipe.get_list_adapters():
        handle.pipe.unload_lora_weights()


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a kill leaves the old file or the new one."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (text if isinstance(exc, TraceEraseError) else f"{type(exc).__name__}: {text}")[:300]


def run_bench(
    handle: ModelHandle,
    methods: list[str],
    concepts: list[str],
    output: str | Path,
    suite: str = "toy-objects",
    seeds: int = 10,
    options: dict[str, Any] | None = None,
    sweep: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
    resume: bool = False,
    scorer: str | Scorer | None = None,
    scorer_options: ScorerOptions | None = None,
    prompts: str | Path | None = None,
    classes: str | None = None,
    retained: list[str] | None = None,
    reference: str | Path | None = None,
    attacks: list[Any] | None = None,
    preserve: list[str] | None = None,
) -> dict[str, Any]:
    """Erase each concept with each method (plus the sweep's variants of ``trace``), evaluate on ``suite`` (built per
    concept with ``prompts``/``classes``/``retained``; scored by ``scorer``, default the suite's), write the tables.

    Work happens in ``OUTPUT.partial/``: each (concept, method) result is committed there as it finishes, so
    ``resume=True`` after an interruption skips the finished ones (refusing changed settings). A run that fails is a
    ``failed`` row with its one-line reason, and the others still run. The folder moves to ``OUTPUT`` at the end.
    ``attacks`` (:class:`~trace_erase.attacks.AttackConfig` list): each erasure is also attacked, each attack run
    once per concept on the base model as the control; the rows gain ``asr_<attack>`` columns. ``preserve``:
    concepts every method is asked to keep (``erase(preserve=...)``; each method that takes a preserve set reads
    it)."""
    from ..api import erase, library_versions

    final = Path(output)
    check_writable(final, overwrite, "bench output")
    suites = {c: build_suite(suite, c, seeds, prompts=prompts, classes=classes, retained=retained) for c in concepts}
    if not isinstance(scorer, Scorer):
        scorer = scorer_for(suites[concepts[0]], scorer, scorer_options)
    for s in suites.values():
        scorer.check(s)
    work = prepare_workdir(final, resume, overwrite, "bench")
    settings = {"model": handle.source, "suite": suite, "concepts": concepts, "methods": methods,
                "seeds_per_prompt": seeds, "options": options or {}, "sweep": list(sweep or []),
                "scheduler": scheduler, "scorer": scorer.identity, "prompts": str(prompts) if prompts else None,
                "classes": classes, "retained": retained, "reference": str(reference) if reference else None,
                "attacks": [a.describe() for a in attacks or []],
                **({"preserve": list(preserve)} if preserve else {})}  # absent when unset: older benches resume
    if attacks and any("," in c for c in concepts):
        raise TraceEraseError("--attacks attacks one erased concept at a time; drop the comma-separated sets")
    if work.exists():
        before = json.loads((work / "settings.json").read_text()) if (work / "settings.json").is_file() else {}
        if before != json.loads(json.dumps(settings)):
            changed = [k for k in settings if before.get(k) != json.loads(json.dumps(settings))[k]]
            raise TraceEraseError(f"--resume with different settings ({', '.join(changed)}) than the interrupted "
                                  "bench; rerun them unchanged, or --overwrite")
    (work / "rows").mkdir(parents=True, exist_ok=True)
    _write_json(work / "settings.json", settings)

    runs = [(m, {}) for m in methods]
    runs += [("trace", dict(extra)) for extra in (sweep or [])]
    rows: list[dict[str, Any]] = []
    for concept in concepts:
        base = None
        controls: dict[str, Any] | None = None
        for method, extra in [*runs, ("base", {})]:
            label = run_label(method, extra)
            row_file = work / "rows" / f"{concept}__{file_label(label)}.json"
            if row_file.is_file():  # finished before an interruption
                rows.append(json.loads(row_file.read_text()))
                continue
            run_dir = run_folder(work, concept, label)
            try:
                if base is None:
                    _reset(handle)
                    base = images_for(handle, suites[concept].items, progress=False, scheduler=scheduler)
                if attacks and controls is None:
                    controls = _attack_controls(handle, attacks, concept, work / "attacks" / concept, scorer)
                row = _bench_run(handle, erase, method, extra, label, concept, base, run_dir, suites[concept],
                                 scorer, seeds, options, scheduler, progress, reference,
                                 per_concept_dir(work, concept, method, extra, options), preserve)
                if attacks and row["status"] == "ok":
                    row.update(_attack_row(handle, attacks, controls, concept, run_dir, scorer))
            except Exception as exc:  # noqa: BLE001 - one bad run is a failed row, not a lost bench
                shutil.rmtree(run_dir, ignore_errors=True)
                row = {"concept": concept, "method": label, "status": "failed", "error": _one_line(exc)}
                if progress:
                    print(f"  {concept:10s} {label:24s} failed: {row['error']}", flush=True)
            _write_json(row_file, row)
            rows.append(row)
    table = summarize(rows, suite)
    result = {
        **settings, "methods": [r[0] for r in runs], "rows": rows, "means": table,
        "versions": library_versions(), "runtime": handle.runtime.describe(),
        "method_configs": {m: dataclasses.asdict(get_method(m)) for m in dict.fromkeys(r[0] for r in runs)},
    }
    _write_json(work / "bench.json", result)
    write_tables(result, work)
    commit_folder(work, final)
    return result


def _bench_run(handle: ModelHandle, erase: Any, method: str, extra: dict[str, Any], label: str, concept: str,
               base: np.ndarray, run_dir: Path, suite: Suite, scorer: Scorer, seeds: int,
               options: dict[str, Any] | None, scheduler: str | None, progress: bool,
               reference: str | Path | None, workdir: Path | None = None,
               preserve: list[str] | None = None) -> dict[str, Any]:
    """One (method, concept) run: erase, evaluate on the shared base images, save; its row of the table."""
    common = {"seeds": seeds, "progress": False, "base_images": base, "scheduler": scheduler, "overwrite": True,
              "scorer": scorer, "reference": reference}
    if method == "base":
        res = evaluate(handle, None, suite, concept, run_dir, **common)
        return {"concept": concept, "method": "base", "status": "ok", **_row_metrics(res), "erase_s": 0.0,
                "units": units(res)}
    spec = get_method(method)
    if handle.adapter.family not in spec.families:
        return {"concept": concept, "method": label, "status": "unsupported"}
    _reset(handle)
    opts = {k: v for k, v in (options or {}).items() if _accepts(spec, k)}
    t0 = time.perf_counter()
    er = erase(handle, concept.split(","), method=method, progress=progress, workdir=workdir,  # "a,b": a set
               preserve=preserve, **opts, **extra)
    wall = time.perf_counter() - t0
    res = evaluate(handle, er, suite, concept, run_dir, **common)
    er.save(run_dir / "erasure")
    if progress:
        m = res["metrics"]["erased"]
        shown = [k for k, _, _ in columns(suite.name, {k for k, v in m.items() if v is not None})]
        print(f"  {concept:10s} {label:24s} " + " ".join(f"{k} {m[k]:.3f}" for k in shown
                                                        if m.get(k) is not None), flush=True)
    reused = er.manifest["timings"].get("stage_b_resumed_s", 0.0)  # e.g. multi=sum reloading fuse's LoRAs
    return {"concept": concept, "method": label, "status": "ok", **_row_metrics(res), "erase_s": wall + reused,
            **({"erase_reused_s": reused} if reused else {}),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "units": units(res)}


def _row_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """A run's metrics for its row: the per-run intervals over seeds (scene suites) are left to the run's own
    results.json; the table's intervals are drawn over concepts × seeds from the row's units."""
    return {k: v for k, v in res["metrics"]["erased"].items() if not k.endswith("_ci95")}


def run_label(method: str, extra: dict[str, Any]) -> str:
    """A run's row label: the method, then each sweep option in brackets (``trace[multi=sum]``)."""
    return method + "".join(f"[{k}={v}]" for k, v in extra.items())


def per_concept_dir(work: Path, concept: str, method: str, extra: dict[str, Any],
                    options: dict[str, Any] | None) -> Path | None:
    """Where a concept set's per-concept stage-B LoRAs live when ``--multi fuse`` and ``sum`` runs could share them.

    Both train one LoRA per concept from the same joint stage A, and ``multi`` does not enter their run hash, so a
    ``trace[multi=sum]`` run beside ``trace`` (fuse) reloads the fuse run's LoRAs instead of training them again
    (each LoRA's stored run hash still guards the match). The same holds for the options that only change how the
    LoRAs are combined (resume-free ones such as ``fusion_null_space``). One folder per method and the options that
    change what is trained.
    """
    if method == "base":
        return None
    from ..config import config_hash
    from ..multi import resolve_multi

    spec = get_method(method)
    opts = {k: v for k, v in {**(options or {}), **extra}.items() if _accepts(spec, k)}
    if not spec.uses_trajectory:
        return None
    # one concept alone, or one LoRA for all (joint): nothing per concept to share
    if resolve_multi(spec, opts.get("multi"), len(concept.split(","))) not in ("fuse", "sum"):
        return None
    from ..engines.trajectory_config import TrajectoryConfig

    shared = {"multi", *TrajectoryConfig.resume_free_keys()}
    key = config_hash({"method": method, **{k: v for k, v in opts.items() if k not in shared}})[:12]
    return work / "stage-b" / concept / key


def _attack_controls(handle: ModelHandle, attacks: list[Any], concept: str, folder: Path,
                     scorer: Scorer) -> dict[str, Any]:
    """Each attack against the base model alone, once per concept (every erasure's run reuses it)."""
    from ..attacks import run_attack

    _reset(handle)
    return {cfg.attack: run_attack(handle, None, cfg, concept, folder / cfg.attack, scorer=scorer, overwrite=True,
                                   progress=False) for cfg in attacks}


def _attack_row(handle: ModelHandle, attacks: list[Any], controls: dict[str, Any], concept: str, run_dir: Path,
                scorer: Scorer) -> dict[str, float]:
    """``asr_<attack>`` of the run's saved erasure (the base row: the control's own rate under the attack)."""
    from ..artifacts.erasure import load_erasure
    from ..attacks import run_attack

    if not (run_dir / "erasure" / "erasure.json").is_file():  # the base row
        return {f"asr_{name}": c["base_asr"] for name, c in controls.items()}
    er = load_erasure(run_dir / "erasure")
    out = {}
    for cfg in attacks:
        res = run_attack(handle, er, cfg, concept, run_dir / "attacks" / cfg.attack, scorer=scorer, overwrite=True,
                         progress=False, control=controls[cfg.attack])
        out[f"asr_{cfg.attack}"] = res["asr"]
    _reset(handle)
    return out


def _accepts(spec: Any, key: str) -> bool:
    from ..engines.closed_form import ClosedFormConfig
    from ..engines.trajectory import TrajectoryConfig

    cf = {f.name for f in dataclasses.fields(ClosedFormConfig)}
    tr = set(TrajectoryConfig.option_keys())
    return (key in cf and spec.uses_closed_form) or (key in tr and spec.uses_trajectory)
