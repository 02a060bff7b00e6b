"""How big a closed-form erasure is once exported, and what truncating it costs.

A closed-form delta is close to full rank, so its exact LoRA can be larger than the weights it edits. For each
``--max-rank`` (none: the numerical rank, with modules written dense where that is smaller) this exports a
``trace-closed-form`` erasure as kohya and reports the LoRA and dense bytes, the relative reconstruction error
(max over modules) and the closed-form certificate of the truncated delta (mean erasure residual, exact → exported).

    python benchmarks/export_size.py --model toy-sd                 # the trained toy model (seconds)
    python benchmarks/export_size.py --arch sd14                    # SD-1.4 architecture, random weights (minutes)
    python benchmarks/export_size.py --model toy-sd --json benchmarks/results/export_size_toy-sd.json

Random weights give random text features: their spectrum is not a trained CLIP's, so the sd14 row measures sizes
and time at real dimensions, not the error a real SD-1.4 would show.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _script import run, write_json

from trace_erase import TraceEraseError, erase
from trace_erase.api import export_erasure
from trace_erase.artifacts.export import ExportOptions
from trace_erase.models import ModelHandle, get_adapter, load_model
from trace_erase.models.builders import sd14_architecture_pipeline


def handle_for(args: argparse.Namespace) -> ModelHandle:
    if args.arch == "sd14":
        pipe = sd14_architecture_pipeline(words=("a", "photo", "of", "cat", "dog", "the", "painting", "car"))
        return ModelHandle(pipe, get_adapter(pipe), "sd14-architecture (random weights)")
    return load_model(args.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sd")
    p.add_argument("--arch", choices=["sd14"], default=None, help="random-weight real architecture instead")
    p.add_argument("--concept", default=None, help="default: square (toy) or cat")
    p.add_argument("--anchor", default="")
    p.add_argument("--ranks", default="none,4,8,16,32,64")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    handle = handle_for(args)
    concept = args.concept or ("cat" if args.arch else "square")
    t0 = time.perf_counter()
    er = erase(handle, [concept], method="trace-closed-form", anchor=args.anchor, progress=False)
    erase_s = time.perf_counter() - t0
    dense_edit = sum(handle.adapter.module(m).weight.numel() for m in er.modules) * 4
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.ranks.split(","):
            max_rank = None if text == "none" else int(text)
            out = Path(tmp) / f"r{text}.safetensors"
            t1 = time.perf_counter()
            try:
                rec = export_erasure(er, handle, ExportOptions(format="kohya", max_rank=max_rank), out)
            except TraceEraseError:  # every module is smaller dense: what the default falls back to
                rec = export_erasure(er, handle, ExportOptions(format="full"), out)
            seconds = time.perf_counter() - t1
            mods = rec["modules"].values()
            lora = [r for r in mods if r["kind"] == "lora"]
            cert = rec.get("certificate", {})
            rows.append({
                "max_rank": max_rank, "export_s": seconds,
                "lora_modules": len(lora), "dense_modules": sum(r["kind"] == "full" for r in mods),
                "numerical_rank_mean": statistics.mean(r["numerical_rank"] for r in mods),
                "bytes": {name: f["bytes"] for name, f in rec["files"].items()},
                "rel_error_max": max((r["rel_error"] for r in lora), default=0.0),
                "residual_exact_mean": statistics.mean(c["exact"]["erasure_residual"] for c in cert.values())
                if cert else None,
                "residual_exported_mean": statistics.mean(c["exported"]["erasure_residual"] for c in cert.values())
                if cert else None,
            })
    result = {"model": handle.source, "concept": concept, "anchor": args.anchor, "erase_s": erase_s,
              "edited_weights_bytes_fp32": dense_edit, "rows": rows}
    print(f"{handle.source}: trace-closed-form '{concept}' in {erase_s:.1f}s; the {len(er.modules)} edited weights "
          f"take {dense_edit / 2**20:.2f} MiB in fp32")
    print("| --max-rank | LoRA modules | dense modules | mean numerical rank | file MiB (LoRA + dense) | "
          "max rel. error | mean residual exact → exported | export s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = sum(r["bytes"].values()) / 2**20
        res = "-" if r["residual_exact_mean"] is None else \
            f"{r['residual_exact_mean']:.4f} → {r['residual_exported_mean']:.4f}"
        print(f"| {r['max_rank'] or 'none'} | {r['lora_modules']} | {r['dense_modules']} | "
              f"{r['numerical_rank_mean']:.1f} | {mib:.2f} | {r['rel_error_max']:.3g} | {res} | {r['export_s']:.2f} |")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run(main)
