"""How big a closed-form erasure is once exported, and what truncating it costs — plain SVD against Gram-weighted.

A closed-form delta is close to full rank, so its exact LoRA can be larger than the weights it edits. For each
``--max-rank`` (none: the numerical rank, with modules written dense where that is smaller) and each truncation
(``svd``: best rank r in the Frobenius norm; ``gram``: best rank r in the metric of the layer's text features, the
solve's own normal matrix) this exports a ``trace-closed-form`` erasure as kohya and reports the file size, the
relative reconstruction error (max over modules), the closed-form certificate of the truncated delta (mean erasure
residual, exact → exported, and how far above the exact one it is), the preserved-prompt change (mean
collateral ‖ΔW p‖/‖W p‖ over preserved rows, exact → exported) and how far the truncation moves preserved features
from where the exact edit puts them (mean ‖(ΔW_r − ΔW) p‖/‖W p‖). The prompts are encoded once for all rows.

    python benchmarks/export_size.py --model toy-sd                 # the trained toy model (seconds)
    python benchmarks/export_size.py --arch sd14                    # SD-1.4 architecture, random weights (minutes)
    python benchmarks/export_size.py --arch sd14 --json benchmarks/results/export_size_sd14-random.json

Random weights give random text features: their spectrum is not a trained CLIP's, so the sd14 rows measure sizes,
time and the two truncations against each other at real dimensions, not the error a real SD-1.4 would show.
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
from trace_erase.artifacts.export import ExportOptions, write_export
from trace_erase.engines.export_stats import ExportStatistics
from trace_erase.models import ModelHandle, get_adapter, load_model
from trace_erase.models.builders import sd14_architecture_pipeline


def handle_for(args: argparse.Namespace) -> ModelHandle:
    if args.arch == "sd14":
        pipe = sd14_architecture_pipeline(words=("a", "photo", "of", "cat", "dog", "the", "painting", "car"))
        return ModelHandle(pipe, get_adapter(pipe), "sd14-architecture (random weights)")
    return load_model(args.model)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def row(rec: dict[str, Any], deviation: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One table row from an export record (and the deviation of its deltas from the exact ones)."""
    mods = rec["modules"].values()
    lora = [r for r in mods if r["kind"] == "lora"]
    cert = rec.get("certificate", {})

    def cmean(side: str, key: str) -> float | None:
        return _mean([c[side][key] for c in cert.values()]) if cert else None

    return {"max_rank": rec["max_rank"], "truncation": rec.get("truncation"), "export_s": seconds,
            "lora_modules": len(lora), "dense_modules": sum(r["kind"] == "full" for r in mods),
            "numerical_rank_mean": statistics.mean(r["numerical_rank"] for r in mods),
            "bytes": {name: f["bytes"] for name, f in rec["files"].items()},
            "rel_error_max": max((r["rel_error"] for r in lora), default=0.0),
            "weighted_error_max": max((r.get("weighted_error") or 0.0 for r in lora), default=0.0),
            "residual_exact_mean": cmean("exact", "erasure_residual"),
            "residual_exported_mean": cmean("exported", "erasure_residual"),
            "collateral_preserve_exact_mean": cmean("exact", "collateral_preserve"),
            "collateral_preserve_exported_mean": cmean("exported", "collateral_preserve"),
            "preserve_deviation_mean": _mean([d["preserve"] for d in deviation.values()]),
            "probe_deviation_mean": _mean([d["probe"] for d in deviation.values()])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sd")
    p.add_argument("--arch", choices=["sd14"], default=None, help="random-weight real architecture instead")
    p.add_argument("--concept", default=None, help="default: square (toy) or cat")
    p.add_argument("--anchor", default="")
    p.add_argument("--preserve", default=None, help="comma-separated concepts to preserve, or none (default: circle "
                                                    "for the toy models, dog,car for sd14)")
    p.add_argument("--ranks", default="none,16,32,64,128")
    p.add_argument("--truncations", default="svd,gram")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    handle = handle_for(args)
    concept = args.concept or ("cat" if args.arch else "square")
    preserve = [] if args.preserve == "none" else (args.preserve or ("dog,car" if args.arch else "circle")).split(",")
    t0 = time.perf_counter()
    er = erase(handle, [concept], method="trace-closed-form", anchor=args.anchor, preserve=preserve, progress=False)
    erase_s = time.perf_counter() - t0
    dense_edit = sum(handle.adapter.module(m).weight.numel() for m in er.modules) * 4
    stats = ExportStatistics(er, handle)
    t1 = time.perf_counter()
    stats.metrics()  # encode the prompts once, outside the timed exports
    stats_s = time.perf_counter() - t1
    rows: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}

    def certify(erasure: Any, h: Any, exported: dict, exact: dict) -> dict:  # also keeps the deviation
        seen["deviation"] = stats.deviation(exported, exact)
        return stats.certify(erasure, h, exported, exact)

    with tempfile.TemporaryDirectory() as tmp:
        for text in args.ranks.split(","):
            max_rank = None if text == "none" else int(text)
            for truncation in args.truncations.split(",") if max_rank else ["svd"]:
                out = Path(tmp) / f"r{text}-{truncation}.safetensors"
                seen.clear()
                t2 = time.perf_counter()
                try:
                    opts = ExportOptions(format="kohya", max_rank=max_rank, truncation=truncation)
                    rec = write_export(er, handle, opts, out, overwrite=True, certify=certify, metric=stats.metrics)
                except TraceEraseError:  # every module is smaller dense: what the default falls back to
                    rec = write_export(er, handle, ExportOptions(format="full"), out, overwrite=True)
                rows.append(row(rec, seen.get("deviation", {}), time.perf_counter() - t2))
    result = {"model": handle.source, "concept": concept, "anchor": args.anchor, "preserve": preserve,
              "erase_s": erase_s, "statistics_s": stats_s, "edited_weights_bytes_fp32": dense_edit, "rows": rows}
    print(f"{handle.source}: trace-closed-form '{concept}' (preserve {', '.join(preserve) or 'none'}) in "
          f"{erase_s:.1f}s; the {len(er.modules)} edited weights take {dense_edit / 2**20:.2f} MiB in fp32; statistics "
          f"{stats_s:.1f}s")
    print("| --max-rank | truncation | file MiB | max rel. error | mean residual exact → exported (excess) | "
          "mean preserve collateral exact → exported | preserve deviation | probe deviation | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = sum(r["bytes"].values()) / 2**20
        res, col = "-", "-"
        if r["residual_exact_mean"] is not None:
            excess = r["residual_exported_mean"] / r["residual_exact_mean"] - 1
            res = f"{r['residual_exact_mean']:.4f} → {r['residual_exported_mean']:.4f} ({excess:+.1%})"
        if r["collateral_preserve_exact_mean"] is not None:
            col = f"{r['collateral_preserve_exact_mean']:.4f} → {r['collateral_preserve_exported_mean']:.4f}"

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        print(f"| {r['max_rank'] or 'none'} | {r['truncation'] or '-'} | {mib:.2f} | {r['rel_error_max']:.3g} | "
              f"{res} | {col} | {fmt(r['preserve_deviation_mean'])} | {fmt(r['probe_deviation_mean'])} | "
              f"{r['export_s']:.2f} |")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run(main)
