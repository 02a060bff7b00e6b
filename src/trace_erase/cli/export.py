"""The ``export`` command and ``info`` on an exported file (registered on the main app in :mod:`.app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import DeviceOpt, DtypeOpt

FormatOpt = Annotated[str | None, typer.Option(help="diffusers (PEFT keys + lora_adapter_metadata), kohya "
                                                    "(lora_unet_ keys) or full (the edited weights, diffusers names); "
                                                    "default kohya; --target picks it for you")]
TargetOpt = Annotated[str | None, typer.Option(help="the tool that will load the file: comfyui, a1111, forge, "
                                                    "invokeai, kohya (sd-scripts) or diffusers; picks format and "
                                                    "placement so every module loads (see docs/artifacts.md)")]
StrictOpt = Annotated[bool, typer.Option(help="with --target: refuse a module the tool cannot load as a LoRA "
                                              "instead of writing it to a companion file")]
TruncationOpt = Annotated[str, typer.Option(help="how --max-rank truncates: gram (best rank-r edit in the metric of "
                                                 "the text features the layer sees) or svd (plain, Frobenius)")]
MaxRankOpt = Annotated[int | None, typer.Option(help="truncate LoRAs to this rank (error recorded); default: the "
                                                     "numerical rank, and dense weights where those are smaller")]
UngatedOpt = Annotated[bool, typer.Option(help="export a gated stage B always-on (no LoRA loader has a timestep "
                                               "gate); recorded in the file")]
PrecisionOpt = Annotated[str, typer.Option(help="tensor precision of the file: fp32, fp16 or bf16")]


def export(
    erasure: Annotated[str, typer.Argument(help="erasure folder (an erase output)")],
    model: Annotated[str, typer.Option(help="the base model the erasure was made for")],
    output: Annotated[str, typer.Option(help="FILE.safetensors to write")],
    target: TargetOpt = None,
    format: FormatOpt = None,
    strict: StrictOpt = False,
    max_rank: MaxRankOpt = None,
    truncation: TruncationOpt = "gram",
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

    options = ExportOptions(format=format if format or target else "kohya", target=target, strict=strict,
                            max_rank=max_rank, truncation=truncation, ungated=ungated, precision=precision)
    check_output(output, overwrite)
    runtime = runtime_from(device, dtype, "none", None)
    er = load_erasure(erasure, allow_pickle=allow_pickle)
    check_gate(er.manifest.get("gate"), options)
    handle = load_model(model, allow_pickle=allow_pickle, runtime=runtime)
    record = export_erasure(er, handle, options, output, overwrite=overwrite)
    echo_record(record, Path(output).parent)


def echo_record(record: dict[str, Any], folder: Path) -> None:
    """One line per written file; what the target's readers load; the companion file's instructions; the modules
    that were truncated."""
    for name, f in record["files"].items():
        typer.echo(f"wrote {folder / name} ({f['kind']}, {f['tensors']} tensors, {f['bytes'] / 2**20:.2f} MiB)")
    if record.get("target"):
        for v in record.get("readers", []):
            if v["status"] == "whole":
                typer.echo(f"  {v['line']}")
    if record.get("companion"):
        typer.echo(f"companion file: {record['companion']['instructions']}")
    mods = record["modules"]
    cut = {m: r for m, r in mods.items() if r["kind"] == "lora" and r["rank"] < r["numerical_rank"]}
    if cut:
        worst = max(r["rel_error"] for r in cut.values())
        typer.echo(f"{len(cut)} modules truncated to rank ≤ {record['max_rank']} ({record.get('truncation') or 'svd'}):"
                   f" relative error max {worst:.3g}")
    if record.get("ungated"):
        typer.echo("the gated stage B was exported always-on (recorded in the file)")


def info_file(path: str) -> None:
    """``trace-erase info FILE.safetensors``: what an exported file holds, where it came from, and what each known
    LoRA reader does with it (judged from the file's keys with the reader table in ``artifacts/readers.py``)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..artifacts.export import read_export_record, read_keys
    from ..artifacts.readers import file_modules
    from ..artifacts.targets import verdicts

    rec = read_export_record(path)
    ex = rec["export"]
    console = Console()
    target = f" for {ex['target']}" if ex.get("target") else ""
    console.print(f"[bold]{path}[/bold]: {ex['format']} export{target} of a [bold]{rec['method']}[/bold] erasure "
                  f"({', '.join(c['name'] for c in rec['concepts'])})")
    base = rec["base_model"]
    console.print(f"  base: {base['source']} ({base['family']}), weights sha256 {base['sha256'][:16]}")
    for name, f in ex["files"].items():
        console.print(f"  file {name}: {f['kind']}, {f['tensors']} tensors, {f['bytes'] / 2**20:.2f} MiB")
    if ex.get("companion"):
        console.print(f"  [bold]companion file[/bold]: {escape(ex['companion']['instructions'])}")
    if ex.get("placeholders"):
        console.print(f"  {len(ex['placeholders'])} zero placeholder module(s) so the reader recognises the file: "
                      f"{', '.join(ex['placeholders'])}")
    if ex.get("ungated"):
        console.print("  [bold]the gated stage B is exported always-on[/bold] (its loaders have no timestep gate)")
    if ex["format"] != "full":
        fmt, names = file_modules(read_keys(path))
        loras = [r for r in ex["modules"].values() if r["kind"] == "lora"]
        worst = max((r["rel_error"] for r in loras), default=0.0)
        console.print(f"  readers ({len(names)} modules in the file; rules read from each reader's code, "
                      "see docs/artifacts.md):")
        for v in verdicts(base["family"], fmt, names):
            extra = f" — truncation error ≤ {worst:.2g} (relative, Frobenius)" if v["status"] == "whole" else ""
            console.print(f"    {escape(v['line'])}{extra}")
    table = Table(title="modules (rank exported / numerical; relative reconstruction error, Frobenius and in the "
                        "layer's Gram metric)")
    for col in ("module", "kind", "rank", "numerical rank", "error", "Gram error",
                "certificate residual (exact → exported)"):
        table.add_column(col)
    cert = ex.get("certificate", {})
    for name, r in ex["modules"].items():
        c = cert.get(name)
        res = "-" if c is None else (f"{c['exact']['erasure_residual']:.3g} → "
                                     f"{c['exported']['erasure_residual']:.3g}")
        werr = "-" if r.get("weighted_error") is None else f"{r['weighted_error']:.2g} ({r.get('truncation')})"
        table.add_row(name, r["kind"], str(r["rank"]) if r["kind"] == "lora" else "-", str(r["numerical_rank"]),
                      f"{r['rel_error']:.2g}", werr, res)
    console.print(table)
