"""The main app and its core commands: erase, generate, info, merge, demo; the other groups register on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import TraceEraseError
from ..io import check_writable
from .common import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    OffloadOpt,
    OverwriteOpt,
    ResumeOpt,
    ScaleConceptOpt,
    SchedulerOpt,
    method_list,
    parse_concept_scales,
    parse_options,
    runtime_from,
)
from .export import MaxRankOpt, UngatedOpt

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Concept erasure for text-to-image diffusion models."
)


@app.command()
def erase(
    model: Annotated[str | None, typer.Option(help="diffusers folder, hub id, or toy-sd / toy-flux")] = None,
    concept: Annotated[list[str] | None, typer.Option(help="concept to erase (repeatable)")] = None,
    anchor: Annotated[str | None, typer.Option(help="surrogate the concept is mapped to ('' by default)")] = None,
    preserve: Annotated[list[str] | None, typer.Option(help="concept to keep intact (repeatable)")] = None,
    method: Annotated[str | None, typer.Option(help=f"erasure method: {method_list()}")] = None,
    output: Annotated[str | None, typer.Option(help="folder to write the erasure to")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file; flags override its values")] = None,
    option: Annotated[list[str] | None, typer.Option(help="engine option KEY=VALUE (repeatable)")] = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    gate_tau: Annotated[float | None, typer.Option(help="stage-B LoRA active only for t < τ at inference")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="allow loading pickle (.bin/.ckpt) weights")] = False,
    multi: Annotated[str | None, typer.Option(help="several concepts: fuse (per-concept stage-B LoRAs + closed-form "
                                                   "integration; TRACE's default), sum, or joint (one LoRA)")] = None,
    format: Annotated[str | None, typer.Option(help="also export to OUTPUT/export-FORMAT.safetensors: kohya, full or "
                                                    "diffusers (see `trace-erase export`)")] = None,
    max_rank: MaxRankOpt = None,
    ungated: UngatedOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
) -> None:
    """Erase concepts from a model and write the erasure (LoRA + erasure.json)."""
    from ..artifacts.export import ExportOptions
    from ..config import load_yaml
    from ..jobs import EraseJob

    options = parse_options(option or [])
    if gate_tau is not None:
        options["gate_tau"] = gate_tau
    if multi is not None:
        options["multi"] = multi  # erase() resolves it (with the method's default) and checks it again
    job = EraseJob.from_config(load_yaml(config) if config else None, where=str(config), model=model, output=output,
                               method=method, concepts=list(concept or []), anchor=anchor,
                               preserve=list(preserve or []), options=options)
    check_writable(job.output, overwrite, "erasure output")  # the first check, as before the job existed
    if format is not None or max_rank is not None or ungated:
        job.export = ExportOptions(format=format or "kohya", max_rank=max_rank, ungated=ungated)
    runtime = runtime_from(device, dtype, offload, None)
    done = job.run(runtime, resume=resume, overwrite=overwrite, allow_pickle=allow_pickle)
    if done is None:  # under accelerate launch the other processes trained their share; one writes
        return
    result, path, records = done
    if records:
        from .export import echo_record

        echo_record(records[0], path)
    summary = result.certificate.get("summary", {})
    typer.echo(
        f"erased {', '.join(c['name'] for c in result.manifest['concepts'])} with {job.method} "
        f"in {result.manifest['timings']['wall_time_s']:.1f}s → {path}"
    )
    if summary:

        def fmt(key: str) -> str:
            value = summary.get(key)
            return "-" if value is None else f"{value:.3g}"

        typer.echo(
            f"certificate: erasure residual max {fmt('erasure_residual_max')} "
            f"(before {fmt('erasure_residual_before_max')}), probe collateral max {fmt('collateral_probe_max')}"
        )


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="diffusers folder, hub id, or toy-sd / toy-flux")],
    prompt: Annotated[list[str], typer.Option(help="prompt (repeatable)")],
    output: Annotated[str, typer.Option(help="folder for the PNGs and generation.json")],
    erasure: Annotated[str | None, typer.Option(help="erasure folder to apply")] = None,
    scale: Annotated[float, typer.Option(help="erasure strength (adapter weight)")] = 1.0,
    scale_concept: ScaleConceptOpt = None,
    seed: Annotated[int, typer.Option(help="seed of the first image")] = 0,
    num_images: Annotated[int, typer.Option(help="images per prompt (seeds seed, seed+1, ...)")] = 1,
    steps: Annotated[int | None, typer.Option(help="sampling steps (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None,
    overwrite: OverwriteOpt = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow loading pickle weights")] = False,
    scheduler: SchedulerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    batch_size: BatchOpt = None,
) -> None:
    """Generate images, optionally with an erasure applied."""
    from ..artifacts.erasure import load_erasure
    from ..engines.fusion import concept_scaled
    from ..io import output_folder
    from ..models import load_model
    from ..models.loading import peek_family
    from ..sampling import check_scheduler, generate_images, sampler_settings

    concept_scales = parse_concept_scales(scale_concept)
    if steps is not None and steps < 1:
        raise TraceEraseError(f"--steps must be ≥ 1 (got {steps})")
    if num_images < 1:
        raise TraceEraseError(f"--num-images must be ≥ 1 (got {num_images})")
    check_writable(output, overwrite)
    check_scheduler(scheduler, peek_family(model))
    runtime = runtime_from(device, dtype, offload, batch_size)
    er = load_erasure(erasure, allow_pickle=allow_pickle) if erasure else None
    if concept_scales and er is None:
        raise TraceEraseError("--scale-concept needs --erasure")
    if concept_scales:
        er = concept_scaled(er, concept_scales)  # checked before the model loads
    handle = load_model(model, allow_pickle=allow_pickle, runtime=runtime)
    if er is not None:
        er.apply(handle, scale=scale)  # a gated erasure installs its gate on the denoiser
    prompts = [p for p in prompt for _ in range(num_images)]
    seeds = [seed + i for _ in prompt for i in range(num_images)]
    images = generate_images(handle, prompts, seeds, steps, guidance, scheduler=scheduler)
    final = Path(output)
    with output_folder(output, overwrite) as tmp:
        records = []
        for i, (img, p, s) in enumerate(zip(images, prompts, seeds, strict=True)):
            name = f"{i:04d}_seed{s}.png"
            img.save(tmp / name)
            records.append({"file": name, "prompt": p, "seed": s})
        settings = {
            "model": model,
            "erasure": erasure,
            "scale": scale if erasure else None,
            **sampler_settings(handle, steps, guidance, scheduler),
            "images": records,
        }
        (tmp / "generation.json").write_text(json.dumps(settings, indent=2) + "\n")
    typer.echo(f"wrote {len(images)} images to {final}")


@app.command()
def info(directory: Annotated[str, typer.Argument(help="erasure folder, or a file written by `export`")]) -> None:
    """Show an erasure's manifest and certificate (or what an exported file holds)."""
    from rich.console import Console
    from rich.table import Table

    from ..artifacts import load_erasure

    if Path(directory).is_file():
        from .export import info_file

        info_file(directory)
        return

    er = load_erasure(directory)
    m = er.manifest
    console = Console()
    console.print(f"[bold]{directory}[/bold]: method [bold]{m['method']}[/bold]")
    for c in m["concepts"]:
        console.print(f"  concept '{c['name']}' → anchor '{c['anchor']}'; preserve {c['preserve'] or '-'}")
    base = m["base_model"]
    console.print(f"  base: {base['source']} ({base['family']}, {base['pipeline_class']}), "
                  f"weights sha256 {base['fingerprint']['sha256'][:16]}")
    console.print(f"  LoRA: {len(m['lora']['target_modules'])} modules, rank {m['lora']['rank']}; "
                  f"wall time {m['timings']['wall_time_s']:.2f}s; peak RSS {m['memory']['peak_rss_mb']:.0f} MiB")
    table = Table(title="erasure certificate (relative, per edited projection)")
    for col in ("module", "residual", "before", "collateral (preserve)", "collateral (probe)"):
        table.add_column(col)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for name, c in m.get("certificate", {}).get("per_module", {}).items():
        table.add_row(name, fmt(c.get("erasure_residual")), fmt(c.get("erasure_residual_before")),
                      fmt(c.get("collateral_preserve")), fmt(c.get("collateral_probe")))
    console.print(table)


@app.command()
def merge(
    model: Annotated[str, typer.Option(help="base model the erasure was made for")],
    erasure: Annotated[str, typer.Option(help="erasure folder")],
    output: Annotated[str, typer.Option(help="folder for the merged pipeline")],
    scale: Annotated[float, typer.Option(help="erasure strength")] = 1.0,
    overwrite: OverwriteOpt = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow loading pickle weights")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Write a full pipeline folder with the erasure fused into its weights (each component in the dtype the base
    model stores it in: a bf16 model stays bf16)."""
    from ..artifacts.erasure import load_erasure
    from ..io import output_folder
    from ..models import load_model
    from ..models.loading import SIDECAR, resolve_model, stored_dtypes

    check_writable(output, overwrite)
    runtime = runtime_from(device, dtype, "none", None)
    er = load_erasure(erasure, allow_pickle=allow_pickle)
    handle = load_model(model, allow_pickle=allow_pickle, runtime=runtime)
    er.merge_into(handle, scale=scale)
    for name, stored in stored_dtypes(model).items():
        component = getattr(handle.pipe, name, None)
        if component is not None and hasattr(component, "to"):
            component.to(dtype=stored)
    final = Path(output)
    with output_folder(output, overwrite) as tmp:
        handle.pipe.save_pretrained(tmp, safe_serialization=True)
        sidecar = Path(resolve_model(model)) / SIDECAR
        if sidecar.is_file():
            shutil.copy(sidecar, tmp / SIDECAR)
    typer.echo(f"wrote merged pipeline to {final}")


@app.command()
def demo(
    output: Annotated[str, typer.Option(help="folder for the erasure and the evaluation")] = "out/demo",
    model: Annotated[str, typer.Option(help="toy model")] = "toy-sd",
    concept: Annotated[str, typer.Option(help="toy class to erase")] = "circle",
    method: Annotated[str, typer.Option(help="erasure method")] = "trace",
    seeds: Annotated[int, typer.Option(help="seeds per prompt in the evaluation")] = 10,
    option: Annotated[list[str] | None, typer.Option(help="engine option KEY=VALUE (repeatable)")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = None,
) -> None:
    """The main job on the embedded toy world: erase a class from toy-sd, evaluate before/after, write a report."""
    from .. import erase as run_erase
    from ..evaluation.run import evaluate
    from ..evaluation.suites import toy_class_of
    from ..methods import get_method
    from ..models import load_model

    out = Path(output)
    check_writable(out, overwrite, "demo output")
    toy_class_of(concept)
    spec = get_method(method)
    options = {**(DEMO_OPTIONS if spec.uses_trajectory else {}), **parse_options(option or [])}
    runtime = runtime_from(device, dtype, "none", batch_size)
    if spec.uses_trajectory:
        runtime.check_training()
    handle = load_model(model, runtime=runtime)
    typer.echo(f"erasing '{concept}' from {model} with {method} ({options or 'defaults'})")
    er = run_erase(handle, [concept], method=method, **options)
    er.save(out / "erasure", overwrite=True)
    typer.echo(f"erasure: {out / 'erasure'} ({er.manifest['timings']['wall_time_s']:.0f}s)")
    res = evaluate(handle, er, "toy-objects", concept, out / "eval", seeds=seeds, overwrite=True)
    print_headline(res)


# the demo's stage-B budget on a 2-core CPU (the method defaults are the spec's 1000 steps)
DEMO_OPTIONS: dict[str, Any] = {"steps": 150}


from .attack import attack  # noqa: E402
from .evaluate import bench, eval_, print_headline, rescore  # noqa: E402
from .export import export  # noqa: E402 - registered in this order

app.command()(export)
app.command("eval")(eval_)
app.command()(rescore)
app.command()(bench)
app.command()(attack)

from .toyworld import toyworld_app  # noqa: E402 - registered after the main commands

app.add_typer(toyworld_app, name="toyworld")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns :class:`TraceEraseError` into one line on stderr and exit code 2."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # library warnings (e.g. transformers' "requires torchvision" on every run) stay off the command's stderr, where
    # a user reads our one-line errors; set the variables to "warning" to see them
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        app(args=argv, standalone_mode=False)
    except TraceEraseError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # usage errors: typer raises its own vendored click's exceptions
        import click

        if isinstance(exc, (click.ClickException, typer.TyperException)) and hasattr(exc, "show"):
            exc.show()
            return exc.exit_code
        raise
    return 0

