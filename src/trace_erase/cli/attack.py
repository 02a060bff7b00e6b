"""The ``attack`` command (registered on the main app in :mod:`.app`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..attacks.config import ATTACKS, LEVELS
from ..io import check_writable
from .common import (
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
    ScorerOpt,
    ThresholdOpt,
    runtime_from,
    scorer_options,
)


def attack(
    model: Annotated[str, typer.Option(help="base model: a diffusers folder, hub id, or toy-sd / toy-flux")],
    attack: Annotated[str, typer.Option(help=f"{', '.join(ATTACKS)}")],
    output: Annotated[str, typer.Option(help="folder for results.json, report.html and the images")],
    erasure: Annotated[str | None, typer.Option(help="erasure folder to attack (omit: the base model alone)")] = None,
    concept: Annotated[str | None, typer.Option(help="the erased concept (default: the erasure's first)")] = None,
    level: Annotated[str | None, typer.Option(help=f"{', '.join(LEVELS)} (default: the attack's own; "
                                                   "conditioning is an upper bound)")] = None,
    budget: Annotated[int | None, typer.Option(help="optimisation steps (soft-prompt, inversion, unlearndiff; p4d: "
                                                    "per scored template), generations (ring-a-bell), prompts per "
                                                    "family (paraphrase) or templates (concept-vector)")] = None,
    seeds: Annotated[int, typer.Option(help="evaluation images per prompt (seeds 0..S-1)")] = 5,
    tokens: Annotated[int | None, typer.Option(help="adversarial tokens / vectors (default 3; inversion 1; "
                                                    "ring-a-bell and p4d 16)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate of an optimising attack")] = None,
    etas: Annotated[str | None, typer.Option(help="concept-vector: comma-separated η values; ring-a-bell: one η")
                    ] = None,
    population: Annotated[int, typer.Option(help="ring-a-bell: prompts per generation")] = 200,
    checkpoints: Annotated[int, typer.Option(help="budget points scored (the ASR-vs-budget curve)")] = 3,
    prompts: Annotated[str | None, typer.Option(help="paraphrase: a prompt file (real models)")] = None,
    suite: Annotated[str, typer.Option(help="the suite whose scorer judges success (toy-objects, objects, "
                                            "celebrities, nudity)")] = "toy-objects",
    scorer: ScorerOpt = None,
    classes: ClassesOpt = None,
    gallery: GalleryOpt = None,
    class_map: ClassMapOpt = None,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    threshold: ThresholdOpt = 0.6,
    scale: Annotated[float, typer.Option(help="erasure strength")] = 1.0,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    batch_size: BatchOpt = None,
) -> None:
    """Attack an erasure (and the base model, the control, with the same attack) and report the attack success
    rate: results.json with every case, report.html with the table, the ASR-vs-budget curve and the images."""
    from ..artifacts.erasure import load_erasure
    from ..attacks.config import AttackConfig
    from ..attacks.run import attack_suite, check_attack, run_attack
    from ..errors import TraceEraseError
    from ..evaluation.scorers import scorer_for
    from ..models import load_model

    check_writable(output, overwrite, "attack output")
    try:
        eta_values = tuple(float(e) for e in etas.split(",")) if etas else None
    except ValueError:
        raise TraceEraseError(f"--etas takes comma-separated numbers (got '{etas}')") from None
    config = AttackConfig(attack, level=level, budget=budget, seeds=seeds, tokens=tokens, lr=lr,
                          checkpoints=checkpoints, prompts=prompts, population=population,
                          **({"etas": eta_values} if eta_values else {}))
    runtime = runtime_from(device, dtype, offload, batch_size)
    er = load_erasure(erasure) if erasure else None
    concept = concept or (er.manifest["concepts"][0]["name"] if er else None)
    if not concept:
        raise TraceEraseError("--concept is needed when no --erasure is given")
    the_suite, label = attack_suite(concept, suite, classes)
    check_attack(config, label)
    the_scorer = scorer_for(the_suite, scorer, scorer_options(gallery, class_map, arch, allow_pickle, threshold,
                                                               runtime))
    handle = load_model(model, runtime=runtime)
    res = run_attack(handle, er, config, concept, output, scorer=the_scorer, suite=suite, classes=classes,
                     scale=scale, overwrite=overwrite)
    typer.echo(f"{res['attack']} ({res['level']} level) on '{res['concept']}' — {res['method']}: ASR "
               f"{100 * res['asr']:.1f} % (no attack {100 * res['pre_asr']:.1f} %); base model under the same "
               f"attack {100 * res['base_asr']:.1f} % (no attack {100 * res['base_rate']:.1f} %) · "
               f"{res['timings']['total_s']:.0f} s · {res['report']}")
