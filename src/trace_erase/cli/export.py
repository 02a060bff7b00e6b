"""The ``export`` command and ``info`` on an exported file (registered on the main app in :mod:`.app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import DeviceOpt, DtypeOpt

FormatOpt = Annotated[str, typer.Option(help="diffusers (PEFT keys + lora_adapter_metadata), kohya (A1111 / Forge / "
                                             "ComfyUI) or full (the edited weights, diffusers names)")]
MaxRankOpt = Annotated[int | None, typer.Option(help="truncate LoRAs to this rank (error recorded); default: the "
                                                     "numerical rank, and dense weights where those are smaller")]
UngatedOpt = Annotated[bool, typer.Option(help="export a gated stage B always-on (no LoRA loader has a timestep "
                                               "gate); recorded in the file")]
PrecisionOpt = Annotated[str, typer.Option(help="tensor precision of the file: fp32, fp16 or bf16")]


def export(
    erasure: Annotated[str, typer.Argument(help="erasure folder (an erase output)")],
    model: Annotated[str, typer.Option(help="the base model the erasure was made for")],
    output: Annotated[str, typer.Option(help="FILE.safetensors to write")],
    format: FormatOpt = "kohya",
    max_rank: MaxRankOpt = None,
    ungated: UngatedOpt = False,
    precision: PrecisionOpt = "fp32",
    overwrite: Annotated[bool, typer.Option(help="replace existing files")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow loading pickle weights")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Write an erasure as a LoRA file other tools load (or as edited weights), with provenance in its metadata."""
    from ..api import export_erasure
    from ..artifacts.erasure import load_erasure
    from ..artifacts.export import ExportOptions, check_gate, check_output
    from ..models import load_model
    from .common import runtime_from

    options = ExportOptions(format=format, max_rank=max_rank, ungated=ungated, precision=precision)
    check_output(output, overwrite)
    runtime = runtime_from(device, dtype, "none", None)
    er = load_erasure(erasure, allow_pickle=allow_pickle)
    check_gate(er.manifest.get("gate"), options)
    handle = load_model(model, allow_pickle=allow_pickle, runtime=runtime)
    record = export_erasure(er, handle, options, output, overwrite=overwrite)
    echo_record(record, Path(output).parent)


def echo_record(record: dict[str, Any], folder: Path) -> None:
    """One line per written file, and the modules that were truncated or written dense."""
    for name, f in record["files"].items():
        typer.echo(f"wrote {folder / name} ({f['kind']}, {f['tensors']} tensors, {f['bytes'] / 2**20:.2f} MiB)")
    mods = record["modules"]
    dense = [m for m, r in mods.items() if r["kind"] == "full"]
    if dense and record["format"] != "full":
        typer.echo(f"{len(dense)} modules are smaller as dense weights than as a LoRA of their numerical rank and "
                   "went to the -full file (A1111/ComfyUI do not load it); pass --max-rank R for a LoRA-only file")
    cut = {m: r for m, r in mods.items() if r["kind"] == "lora" and r["rank"] < r["numerical_rank"]}
    if cut:
        worst = max(r["rel_error"] for r in cut.values())
        typer.echo(f"{len(cut)} modules truncated to rank ≤ {record['max_rank']}: relative error max {worst:.3g}")
    if record.get("ungated"):
        typer.echo("the gated stage B was exported always-on (recorded in the file)")


def info_file(path: str) -> None:
    """``trace-erase info FILE.safetensors``: what an exported file holds and where it came from."""
    from rich.console import Console
    from rich.table import Table

    from ..artifacts.export import read_export_record

    rec = read_export_record(path)
    ex = rec["export"]
    console = Console()
    console.print(f"[bold]{path}[/bold]: {ex['format']} export of a [bold]{rec['method']}[/bold] erasure "
                  f"({', '.join(c['name'] for c in rec['concepts'])})")
    base = rec["base_model"]
    console.print(f"  base: {base['source']} ({base['family']}), weights sha256 {base['sha256'][:16]}")
    for name, f in ex["files"].items():
        console.print(f"  file {name}: {f['kind']}, {f['tensors']} tensors, {f['bytes'] / 2**20:.2f} MiB")
    if ex.get("ungated"):
        console.print("  [bold]the gated stage B is exported always-on[/bold] (its loaders have no timestep gate)")
    table = Table(title="modules (rank exported / numerical; relative reconstruction error)")
    for col in ("module", "kind", "rank", "numerical rank", "error", "certificate residual (exact → exported)"):
        table.add_column(col)
    cert = ex.get("certificate", {})
    for name, r in ex["modules"].items():
        c = cert.get(name)
        res = "-" if c is None else (f"{c['exact']['erasure_residual']:.3g} → "
                                     f"{c['exported']['erasure_residual']:.3g}")
        table.add_row(name, r["kind"], str(r["rank"]) if r["kind"] == "lora" else "-", str(r["numerical_rank"]),
                      f"{r['rel_error']:.2g}", res)
    console.print(table)
