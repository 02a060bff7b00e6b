"""Merge `trace-erase bench` outputs that split the concepts across processes into one bench.json + bench.md
(+ figures and report.html).

Two 1-thread processes on disjoint concept lists finish in half the wall time of one; this recomputes the means
over all their rows with the bench's own code. The runs must share model, suite, seeds, options and sweep.

    python benchmarks/merge_bench.py out/sweep-a/bench.json out/sweep-b/bench.json --output out/sweep

With --relabel the runs may use different --option values (variants run in parallel): each run's rows are named
after its options, e.g. ``trace{reference=original}``, and become rows of one table. --concepts keeps only some
classes (``dev``, ``test`` or a list), e.g. to set a variant run on the development half beside the defaults' rows
of an all-classes bench. --seeds N keeps each run's first N seeds (accuracies, headline and drift recomputed from
the per-seed units; SSIM and FID left out), so that a 10-seed run sits beside 5-seed ones on the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _script import refuse, run

from trace_erase.benchmark.tables import keep_concepts, keep_seeds, markdown, merge_results, write_tables
from trace_erase.evaluation.intervals import units
from trace_erase.io import output_folder, run_folder


def with_units(path: Path) -> dict:
    """A bench.json whose rows carry per-seed units (for the intervals); a bench written before rows had them gets
    them from its runs' saved results.json (per-image judgements), where the run folders are still next to it."""
    result = json.loads(path.read_text())
    for row in result["rows"]:
        saved = run_folder(path.parent, row["concept"], row["method"]) / "results.json"
        if row.get("status") == "ok" and not row.get("units") and saved.is_file():
            row["units"] = units(json.loads(saved.read_text()))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="bench.json files")
    ap.add_argument("--output", type=Path, required=True, help="folder for the merged bench.json and bench.md")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--relabel", action="store_true", help="runs with different --option values: name rows by them")
    ap.add_argument("--concepts", help="keep only these concepts: dev, test (the toy halves) or a comma list")
    ap.add_argument("--first-wins", action="store_true",
                    help="a (concept, method) row in two runs: keep the first run's instead of refusing")
    ap.add_argument("--seeds", type=int, help="keep only each run's first N seeds (runs of different seed counts)")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        refuse(f"not found: {', '.join(missing)}; give the bench.json files of finished runs")
    result = merge_results([keep_seeds(keep_concepts(with_units(p), args.concepts), args.seeds) for p in args.inputs],
                           relabel=args.relabel, first_wins=args.first_wins)
    with output_folder(args.output, args.overwrite, "merged bench output") as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        write_tables(result, tmp)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    run(main)
