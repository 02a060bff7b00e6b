"""``trace-erase toyworld …``: train, check and score the embedded toy world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import TraceEraseError
from .common import BatchOpt, DeviceOpt, DtypeOpt, runtime_from

toyworld_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="The embedded toy world (toy-sd, toy-flux, toy-sd-scenes, toy-flux-scenes).",
)


@toyworld_app.command("train")
def toyworld_train(
    family: Annotated[str, typer.Option(help="sd or flux")],
    output: Annotated[str | None, typer.Option(help="pipeline folder (default: the bundled location)")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="denoiser steps (default: the bundled model's)")] = None,
    cycles: Annotated[int | None, typer.Option(
        min=1, help="cosine cycles with warm restarts (default: the preset's)")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="denoiser batch size (default: the preset's)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override any other recipe setting, KEY=VALUE (repeatable), e.g. --set latent_channels=8")]
        = None,
    start_from: Annotated[str | None, typer.Option(
        help="skip the first cycles: a pipeline trained by this command with them (e.g. the previous bundle)")]
        = None,
    scenes: Annotated[bool, typer.Option(
        help="the scene world's model (toy-sd-scenes / toy-flux-scenes: 64×32 two-slot pictures, fine-tuned from "
             "toy-sd / toy-flux)")] = False,
    micro: Annotated[bool, typer.Option(help="tiny sizes and a few steps (tests)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output / restart a partial run")] = False,
) -> None:
    """Train a toy pipeline; rerunning the same command resumes an interrupted run from its last checkpoint."""
    import dataclasses

    from ..models.loading import BUNDLED_DIR
    from ..toyworld.config import override, preset
    from ..toyworld.train import ToyTrainer

    cfg = override(preset(family, micro=micro, scenes=scenes), set_ or [])
    overrides = {k: v for k, v in {"steps": steps, "cycles": cycles, "batch": batch}.items() if v is not None}
    cfg = dataclasses.replace(cfg, seed=seed, **overrides)
    out = output or str(BUNDLED_DIR / cfg.name)
    trainer = ToyTrainer(cfg, out, overwrite=overwrite, start_from=start_from)
    if trainer.ckpt_path.exists():
        typer.echo(f"resuming from {trainer.ckpt_path}")
    path = trainer.run()
    typer.echo(f"wrote {cfg.name} to {path}")


@toyworld_app.command("train-classifier")
def toyworld_train_classifier(
    output: Annotated[str | None, typer.Option(help="folder (default: the bundled location)")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
) -> None:
    """Train the toy classifier (object class, style, colour) and report held-out accuracy."""
    from ..toyworld.classifier import CLASSIFIER_DIR, heldout_accuracy, save_classifier, train_classifier

    model = train_classifier(seed=seed)
    acc = heldout_accuracy(model)
    save_classifier(model, Path(output) if output else CLASSIFIER_DIR, acc)
    typer.echo("held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))


def _training_record(model: str) -> dict:
    """The recipe and its training time from the model's sidecar, to sit next to the figures."""
    from ..models.loading import SIDECAR, resolve_model

    sidecar = Path(resolve_model(model)) / SIDECAR
    if not sidecar.is_file():
        return {}
    meta = json.loads(sidecar.read_text())
    return {"training": meta.get("training"), "training_seconds": meta.get("training_seconds")}


@toyworld_app.command("check")
def toyworld_check(
    model: Annotated[str, typer.Option(help="toy-sd, toy-flux or a toy pipeline folder (scene models too)")] = "toy-sd",
    seeds: Annotated[int, typer.Option(
        help="seeds per prompt (scene models: pictures per test, each its own prompt and seed)")] = 50,
    scenes: Annotated[bool, typer.Option(
        help="the scene check (chosen by itself for a scene model; refused for a single-object one)")] = False,
    output: Annotated[str | None, typer.Option(help="write the figures as JSON here")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = None,
) -> None:
    """Score a toy pipeline's samples: single-object models with the toy classifier (per class, synonyms, styles,
    unconditional), scene models with the scene scorer (classes, sides, colours, empty slots)."""
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model
    from ..sampling import sampler_settings
    from ..toyworld.check import quality_check, vae_reconstruction
    from ..toyworld.render import CLASSES
    from ..toyworld.scene_check import model_world, require_scene_model, scene_prompts

    if seeds < 1:
        raise TraceEraseError(f"--seeds must be ≥ 1 (got {seeds})")
    if scenes:
        require_scene_model(model)
    if scenes or model_world(model) == "scenes":
        scene_prompts(seeds)  # bad input is refused before the model loads
        _scene_check(model, seeds, output, runtime_from(device, dtype, "none", batch_size))
        return
    handle = load_model(model, runtime=runtime_from(device, dtype, "none", batch_size))
    res = quality_check(handle, seeds=seeds)
    res["vae_reconstruction"] = vae_reconstruction(handle.pipe.vae)
    res["model"] = model
    res["sampler"] = sampler_settings(handle)
    res.update(_training_record(model))
    table = Table(title=f"{model}: classifier accuracy, {seeds} seeds per prompt, {res['sampler']}")
    for col in ("class", "object", "synonyms", "unconditional count"):
        table.add_column(col)
    for c in CLASSES:
        table.add_row(c, f"{res['object'][c]:.2f}", f"{res['synonym'][c]:.2f}", str(res["unconditional_histogram"][c]))
    table.add_row("mean", f"{res['object_mean']:.3f}", f"{res['synonym_mean']:.3f}",
                  f"top share {res['unconditional_top_share']:.2f}")
    console = Console()
    console.print(table)
    console.print("style accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in res["style"].items())
                  + f"; mean {res['style_mean']:.3f}")
    console.print("VAE reconstruction (classifier accuracy on encode→decode of renders): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res["vae_reconstruction"].items() if isinstance(v, float)))
    if output:  # written beside, then renamed: a kill leaves no half-written file
        from ..io import atomic_write

        atomic_write(output, json.dumps(res, indent=2) + "\n")


def _scene_check(model: str, seeds: int, output: str | None, runtime: object) -> None:
    """Run the scene check on ``model`` and print its table (and write the JSON to ``output``)."""
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model
    from ..sampling import sampler_settings
    from ..toyworld.scene_check import LABELS, scene_quality_check

    handle = load_model(model, runtime=runtime)
    res = scene_quality_check(handle, seeds=seeds)
    res["model"] = model
    res["sampler"] = sampler_settings(handle)
    res.update(_training_record(model))
    sampler = res["sampler"]
    table = Table(title=f"{model}: scene scorer, {seeds} pictures per test, {sampler['scheduler']} "
                        f"{sampler['steps']} steps, guidance {sampler['guidance']}, {sampler['resolution']}")
    for col in ("test", "value", "bar", ""):
        table.add_column(col)
    for key, label in LABELS.items():
        bar = res["bars"].get(key)
        verdict = "" if bar is None else ("pass" if res["passed"][key] else "FAIL")
        table.add_row(label, f"{res['figures'][key]:.3f}", "" if bar is None else f"≥ {bar:.2f}", verdict)
    console = Console()
    console.print(table)
    console.print("held-out (left, right) pairs: " + ", ".join(f"{a}/{b}" for a, b in res["heldout_pairs"]))
    if output:  # written beside, then renamed: a kill leaves no half-written file
        from ..io import atomic_write

        atomic_write(output, json.dumps(res, indent=2) + "\n")
