"""The evaluation commands: ``eval``, ``rescore`` and ``bench`` (registered on the main app in :mod:`.app`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import TraceEraseError
from ..io import check_writable
from .common import (
    SUITE_HELP,
    AllowPickleOpt,
    ArchOpt,
    BatchOpt,
    ClassesOpt,
    ClassMapOpt,
    DeviceOpt,
    DtypeOpt,
    GalleryOpt,
    OffloadOpt,
    OverwriteOpt,
    PromptsOpt,
    ReferenceOpt,
    ResumeOpt,
    RetainedOpt,
    ScaleConceptOpt,
    SchedulerOpt,
    ScorerOpt,
    ThresholdOpt,
    name_list,
    parse_concept_scales,
    parse_options,
    runtime_from,
    scorer_options,
)

if TYPE_CHECKING:
    from ..evaluation.scorers import Scorer, ScorerOptions
    from ..evaluation.suites import Suite


def _suite_and_scorer(model: str, suite: str, concept: str, seeds: int, prompts: str | None, classes: str | None,
                      retained: str | None, reference: str | None, scorer: str | None,
                      options: ScorerOptions) -> tuple[Suite, Scorer]:
    """The suite (prompt file read, concept checked) and its scorer (loaded, labels checked) of a command's options,
    and the suite's other needs (a reference folder; a scene model for a scene suite, from its sidecar) — all before
    the diffusion model loads."""
    from ..evaluation.scene_suite import check_scene_model
    from ..evaluation.scorers import scorer_for
    from ..evaluation.scoring import check_protocol
    from ..evaluation.suites import build_suite

    the_suite = build_suite(suite, concept, seeds, prompts=prompts, classes=classes, retained=name_list(retained))
    the_scorer = scorer_for(the_suite, scorer, options)
    check_protocol(the_suite, reference)
    check_scene_model(model, the_suite, getattr(the_scorer, "image_size", None))
    return the_suite, the_scorer


def eval_(
    model: Annotated[str, typer.Option(help="base model: a diffusers folder, hub id, or toy-sd / toy-flux")],
    output: Annotated[str, typer.Option(help="folder for results.json, report.html and the images")],
    suite: Annotated[str, typer.Option(help=SUITE_HELP)] = "toy-objects",
    erasure: Annotated[str | None, typer.Option(help="erasure folder to evaluate (omit: the base model)")] = None,
    scorer: ScorerOpt = None,
    prompts: PromptsOpt = None,
    classes: ClassesOpt = None,
    retained: RetainedOpt = None,
    gallery: GalleryOpt = None,
    class_map: ClassMapOpt = None,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    threshold: ThresholdOpt = 0.6,
    concept: Annotated[str | None, typer.Option(help="erased concept (default: the erasure's first)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per built-in prompt")] = 10,
    scale: Annotated[float, typer.Option(help="erasure strength")] = 1.0,
    scale_concept: ScaleConceptOpt = None,
    reference: ReferenceOpt = None,
    fid_features: Annotated[str, typer.Option(help="FID features: toy, inception (--fid-weights FILE) or clip "
                                                   "(--fid-weights CLIP_FOLDER)")] = "toy",
    fid_weights: Annotated[str | None, typer.Option(help="weights path for the FID feature network")] = None,
    clip_model: Annotated[str | None, typer.Option(help="local CLIPModel folder: adds the CLIP score")] = None,
    show_nudity: Annotated[bool, typer.Option(help="nudity suite: unblurred images in report.html")] = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    scheduler: SchedulerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    batch_size: BatchOpt = None,
) -> None:
    """Evaluate an erasure (before/after on the same seeds) on a suite with a scorer; write results.json (every
    image's judgement, the scorer's identity) and report.html. Generated batches are kept in OUTPUT.partial as they
    finish, so --resume continues an interrupted evaluation."""
    from ..artifacts.erasure import load_erasure
    from ..evaluation.run import evaluate
    from ..io import prepare_workdir
    from ..models import load_model
    from ..models.loading import peek_family
    from ..sampling import check_scheduler

    check_writable(output, overwrite, "evaluation output")
    check_scheduler(scheduler, peek_family(model))
    runtime = runtime_from(device, dtype, offload, batch_size)
    er = load_erasure(erasure) if erasure else None
    concept_scales = parse_concept_scales(scale_concept)
    if concept_scales:
        if er is None:
            raise TraceEraseError("--scale-concept needs --erasure")
        from ..engines.fusion import concept_scaled

        er = concept_scaled(er, concept_scales)
    concept = concept or (er.manifest["concepts"][0]["name"] if er else None)
    the_suite, the_scorer = _suite_and_scorer(model, suite, concept or "", seeds, prompts, classes, retained,
                                              reference, scorer, scorer_options(gallery, class_map, arch,
                                                                                allow_pickle, threshold, runtime))
    workdir = prepare_workdir(output, resume, overwrite, "evaluation")
    handle = load_model(model, runtime=runtime)
    res = evaluate(handle, er, the_suite, concept, output, seeds=seeds, scale=scale, overwrite=overwrite,
                   reference=reference, fid_features=fid_features, fid_weights=fid_weights, clip_model=clip_model,
                   scheduler=scheduler, workdir=workdir, scorer=the_scorer, show_nudity=show_nudity)
    shutil.rmtree(workdir, ignore_errors=True)
    print_headline(res)


def rescore(
    results_dir: Annotated[str, typer.Argument(help="an evaluation output folder (results.json + images/)")],
    output: Annotated[str, typer.Option(help="folder for the rescored results.json and report.html")],
    scorer: ScorerOpt = None,
    gallery: GalleryOpt = None,
    class_map: ClassMapOpt = None,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    threshold: ThresholdOpt = 0.6,
    reference: ReferenceOpt = None,
    fid_features: Annotated[str, typer.Option(help="FID features (with --reference)")] = "toy",
    fid_weights: Annotated[str | None, typer.Option(help="weights path for the FID feature network")] = None,
    show_nudity: Annotated[bool, typer.Option(help="nudity suite: unblurred images in report.html")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Score an evaluation's saved images again with another scorer (nothing is regenerated): same prompts, seeds
    and sampler; the new scorer's identity and judgements in a new folder."""
    from ..evaluation.rescoring import rescore as run_rescore

    runtime = runtime_from(device, "auto", "none", None)
    res = run_rescore(results_dir, scorer, output, scorer_options(gallery, class_map, arch, allow_pickle, threshold,
                                                                  runtime),
                      reference=reference, overwrite=overwrite, fid_features=fid_features, fid_weights=fid_weights,
                      show_nudity=show_nudity)
    print_headline(res)


def print_headline(res: dict[str, Any]) -> None:
    from ..evaluation.metrics import columns

    b, e = res["metrics"]["base"], res["metrics"]["erased"]
    cols = columns(res["suite"], {k for k, v in e.items() if v is not None})

    def f(v: float | None, d: int) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    scorer = res["settings"].get("scorer", {})
    typer.echo(f"{res['method']} on '{res['concept']}' ({res['suite']}, {len(res['prompts'])} images, scorer "
               f"{scorer.get('name')}):")
    for key, label, d in cols:
        ci = e.get(f"{key}_ci95")
        typer.echo(f"  {label:28s} base {f(b.get(key), d)}  →  erased {f(e.get(key), d)}"
                   + (f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else ""))
    typer.echo(f"report: {res['report']}")


def bench(
    model: Annotated[str, typer.Option(help="base model: a diffusers folder, hub id, or toy-sd / toy-flux")],
    output: Annotated[str, typer.Option(help="folder for bench.md, bench.json and per-run reports")],
    methods: Annotated[str, typer.Option(help="comma-separated methods")] =
        "trace,trace-closed-form,uce,mace-cfr,esd-x,esd-u,ant",
    concepts: Annotated[str, typer.Option(help="'all' (every class of an objects suite), 'dev' / 'test' (the toy "
                                               "classes' fixed halves) or comma-separated concepts")] = "all",
    suite: Annotated[str, typer.Option(help=SUITE_HELP)] = "toy-objects",
    scorer: ScorerOpt = None,
    prompts: PromptsOpt = None,
    classes: ClassesOpt = None,
    retained: RetainedOpt = None,
    gallery: GalleryOpt = None,
    class_map: ClassMapOpt = None,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    threshold: ThresholdOpt = 0.6,
    reference: ReferenceOpt = None,
    seeds: Annotated[int, typer.Option(help="seeds per prompt")] = 10,
    option: Annotated[list[str] | None, typer.Option(help="engine option KEY=VALUE for every method")] = None,
    sweep: Annotated[str | None, typer.Option(help="extra trace runs, e.g. tau=0.3,0.5,0.7,0.86; "
                                                             "+ joins options of one run: a=1+b=2,3")] = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    scheduler: SchedulerOpt = None,
    concept_counts: Annotated[str | None, typer.Option(
        "--concept-counts", "--multi", help="toy-objects: erase N classes at once for each N, e.g. 1,2,5,8 (quality "
        "and interference against N; --multi is its former name)")] = None,
    subsets: Annotated[int, typer.Option(help="--concept-counts: seeded class subsets per N > 1")] = 5,
    singletons: Annotated[str | None, typer.Option(help="--concept-counts: take N = 1 (each class alone) from this "
                                                        "bench.json "
                                                        "of single classes (same model, seeds and options) "
                                                        "instead of rerunning it")] = None,
    preserve_retained: Annotated[bool, typer.Option(help="--concept-counts: ask every method to keep the toy "
                                                         "classes a set does not erase (its --preserve)")] = False,
    attacks: Annotated[str | None, typer.Option(help="also attack every erasure (and the base model as the control) "
                                                     "with these, e.g. paraphrase,concept-vector,soft-prompt,"
                                                     "inversion: ASR columns")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    batch_size: BatchOpt = None,
) -> None:
    """Erase each concept with each method on the same seeds and evaluate on a suite; write the comparison table
    with the suite's own columns (each run is committed as it finishes: --resume continues an interrupted bench; a
    failed run is a row with its reason)."""
    from ..attacks import AttackConfig
    from ..benchmark.bench import parse_sweep, run_bench
    from ..benchmark.plan import check_concept_counts, check_methods, resolve_concepts
    from ..evaluation.suites import SCENE_SUITES
    from ..models import load_model

    if Path(output).exists() and not overwrite and not (concept_counts and resume):
        check_writable(output, overwrite, "bench output")
    runtime = runtime_from(device, dtype, offload, batch_size)
    method_list = check_methods(model, methods, runtime, scheduler, sweep)
    attack_configs = [AttackConfig(a.strip()) for a in attacks.split(",") if a.strip()] if attacks else None
    concept_list = resolve_concepts(concepts, suite, classes)
    pool = concept_list if concept_counts and concepts != "all" else None
    counts = check_concept_counts(concept_counts, suite, prompts, subsets, singletons, model, seeds,
                                  parse_options(option or []), bool(attacks), pool, preserve_retained)
    if attacks and suite in SCENE_SUITES:
        raise TraceEraseError(f"--attacks are scored on single-object suites; drop --attacks for --suite {suite}")
    _, the_scorer = _suite_and_scorer(model, suite, concept_list[0] if concept_list else "", seeds, prompts,
                                      classes, retained, reference, scorer,
                                      scorer_options(gallery, class_map, arch, allow_pickle, threshold, runtime))
    handle = load_model(model, runtime=runtime)
    if counts is not None:
        from ..benchmark.many_concepts import run_multi_bench

        res = run_multi_bench(handle, method_list, counts, output, subsets=subsets, seeds=seeds, singletons=singletons,
                              pool=pool, preserve_retained=preserve_retained,
                              options=parse_options(option or []), sweep=parse_sweep(sweep), overwrite=overwrite,
                              scheduler=scheduler, resume=resume, scorer=the_scorer)
        typer.echo((Path(output) / "multi.md").read_text())
        typer.echo(f"wrote {Path(output) / 'multi.md'} ({len(res['rows'])} runs)")
        return
    result = run_bench(handle, method_list, concept_list, output, suite=suite, seeds=seeds,
                       options=parse_options(option or []), sweep=parse_sweep(sweep), overwrite=overwrite,
                       scheduler=scheduler, resume=resume, scorer=the_scorer, prompts=prompts, classes=classes,
                       retained=name_list(retained), reference=reference, attacks=attack_configs)
    from ..benchmark.tables import markdown

    typer.echo(markdown(result))
    typer.echo(f"wrote {Path(output) / 'bench.md'}")
