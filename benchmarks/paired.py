"""Paired differences between methods of finished benches: the focus method's headline (H_o / H_s / H_c) and drift
minus each other method's, with 95 % intervals from resampling classes and seeds jointly for both methods.

Benches of the same model, suite and seeds can be given together (e.g. a development run and a later sweep over the
same classes; a multi bench's sets as their ``N*/set*/set_rows.json``); rows pair by class (or concept set) and
seed. The bench table's own intervals are per method: they overlap long after
the paired interval of the difference has cleared 0, so a ranking claim needs this one.

    python benchmarks/paired.py benchmarks/results/reference-choice-dev-toy-sd-objects/bench.json --focus trace
    python benchmarks/paired.py A/bench.json B/bench.json --focus "trace[reference=anchor]" --against trace \
        [--json out.json]
    python benchmarks/paired.py TEN_SEEDS/bench.json FIVE_SEEDS/bench.json --focus trace --seeds 5

``--seeds N`` pairs benches run with different seed counts on their first N seeds (0..N−1), which every bench must
have: seeds are drawn in order, so a 10-seed run's first five images are a 5-seed run's five.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _script import refuse, run, write_json

SAME = ("model", "suite", "seeds_per_prompt")  # what benches must share for their rows to pair


def load_rows(paths: list[str], seeds: int | None = None) -> tuple[dict[str, Any], dict[str, dict[str, list[dict]]]]:
    """(the benches' shared settings, method → class → per-seed units); a (method, class) in two benches keeps the
    first bench's rows. With ``seeds``, only seeds 0..seeds−1 of each, and benches of more seeds pair too."""
    shared: dict[str, Any] = {}
    rows: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        file = Path(path)
        if not file.is_file():
            refuse(f"'{path}' does not exist; pass a finished bench's bench.json")
        data = json.loads(file.read_text())
        if "group" in data and "rows" in data:  # a multi bench's set: its rows keep the per-seed units
            data = set_bench(file, data)
        if "rows" not in data or "suite" not in data:
            refuse(f"'{path}' is not a bench.json (no rows); pass the bench.json a finished `trace-erase bench` wrote")
        if seeds is not None:
            if (data.get("seeds_per_prompt") or 0) < seeds:
                refuse(f"'{path}' has {data.get('seeds_per_prompt')} seeds per prompt, fewer than --seeds {seeds}; "
                       "lower --seeds")
            data = {**data, "seeds_per_prompt": seeds,
                    "rows": [{**r, "units": [u for u in r.get("units") or [] if u["seed"] < seeds]}
                             for r in data["rows"]]}
        for key in SAME:
            if shared.setdefault(key, data.get(key)) != data.get(key):
                refuse(f"'{path}' has {key} {data.get(key)!r} where the first bench has {shared[key]!r}; pair benches "
                       "of one model, suite and seed count (or pass --seeds N to pair their first N seeds)")
        added: dict[str, dict[str, list[dict]]] = {}
        for row in data["rows"]:
            if row.get("status", "ok") == "ok" and row.get("units"):
                added.setdefault(row["method"], {})[row["concept"]] = row["units"]
        for method, per_class in added.items():
            for cls, units in per_class.items():
                rows.setdefault(method, {}).setdefault(cls, units)
    return shared, rows


def set_bench(file: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A multi bench's ``N*/set*/set_rows.json`` (the part of a set git keeps) read as a bench: the objects suite,
    the model from the bench's ``multi.json`` two folders up, the seed count from the rows."""
    rows = [r["row"] for r in data["rows"]]
    multi = file.parent.parent.parent / "multi.json"
    model = json.loads(multi.read_text())["model"] if multi.is_file() else None
    seeds = max((len(r.get("units") or []) for r in rows), default=0)
    return {"model": model, "suite": "toy-objects", "seeds_per_prompt": seeds, "rows": rows}


def compare(suite: str, rows: dict[str, dict[str, list[dict]]], focus: str, against: list[str]) -> list[dict]:
    """One record per other method: the classes both ran, and the paired headline and drift differences."""
    from trace_erase.evaluation.intervals import paired_bootstrap

    if focus not in rows:
        refuse(f"no rows of '{focus}' in these benches; methods there: {', '.join(sorted(rows))}")
    out = []
    for other in against:
        if other not in rows:
            refuse(f"no rows of '{other}' in these benches; methods there: {', '.join(sorted(rows))}")
        classes = sorted(set(rows[focus]) & set(rows[other]))
        if not classes:
            refuse(f"'{focus}' and '{other}' share no class; pass benches over the same classes")
        diff = paired_bootstrap(suite, [rows[focus][c] for c in classes], [rows[other][c] for c in classes])
        out.append({"other": other, "classes": classes, **diff})
    return out


def table(suite: str, focus: str, records: list[dict]) -> str:
    """Markdown: one line per other method, differences as focus − other."""
    from trace_erase.evaluation.intervals import HEADLINE

    head = HEADLINE.get(suite, "headline")

    def cell(d: dict | None, digits: int, higher_is_better: bool) -> str:
        if d is None:
            return "–"
        lo, hi = d["ci"]
        better, worse = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
        mark = " ✓" if better else " ✗" if worse else ""
        return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"

    lines = [f"| {focus} − … | classes | Δ {head} | Δ drift L2 |", "|---|---|---|---|"]
    for r in records:
        head_cell, drift_cell = cell(r["headline"], 3, True), cell(r["drift_l2"], 4, False)
        lines.append(f"| {r['other']} | {len(r['classes'])} | {head_cell} | {drift_cell} |")
    lines.append("\nPaired 95 % bootstrap over classes × seeds (2,000 draws). ✓: the focus is better with the "
                 "interval clear of 0 (higher headline, lower drift), ✗: worse.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benches", nargs="+", help="bench.json files of one model, suite and seed count")
    parser.add_argument("--focus", required=True, help="the method the differences are about, as the table names it")
    parser.add_argument("--against", help="comma-separated methods (default: every other method but base)")
    parser.add_argument("--json", help="also write the records here")
    parser.add_argument("--seeds", type=int, help="pair on seeds 0..N−1 only (benches of different seed counts)")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 1:
        refuse(f"--seeds must be ≥ 1 (got {args.seeds})")
    shared, rows = load_rows(args.benches, args.seeds)
    against = args.against.split(",") if args.against else [m for m in rows if m not in ("base", args.focus)]
    records = compare(shared["suite"], rows, args.focus, against)
    print(table(shared["suite"], args.focus, records))
    if args.json:
        write_json(args.json, {**shared, "focus": args.focus, "records": records})


if __name__ == "__main__":
    run(main)
