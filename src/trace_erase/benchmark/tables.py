"""The bench's tables: means over concepts with intervals (``summarize``), merging runs that split the work,
cutting a result to some concepts or to its first seeds, and the written outputs (``bench.md``, figures,
``report.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceEraseError
from ..evaluation.intervals import intervals, unit_metrics
from ..evaluation.metrics import columns
from ..evaluation.suites import SCENE_SUITES

NOT_METRICS = {"concept", "method", "status", "error", "erase_s", "erase_reused_s", "peak_rss_mb"}  # not metrics


def summarize(rows: list[dict[str, Any]], suite: str | None = None) -> list[dict[str, Any]]:
    """Means over concepts per method (base first), with bootstrap 95 % intervals of the headline metric and the
    drift where the rows carry per-seed units; unsupported methods are listed as such."""
    order = ["base"] + list(dict.fromkeys(r["method"] for r in rows if r["method"] != "base"))
    out = []
    for method in order:
        mine = [r for r in rows if r["method"] == method]
        if mine and all(r["status"] == "unsupported" for r in mine):
            out.append({"method": method, "status": "unsupported"})
            continue
        ok = [r for r in mine if r["status"] == "ok"]
        entry = {"method": method, "status": "ok", "concepts": len(ok),
                 "failed": sum(r["status"] == "failed" for r in mine)}
        keys = dict.fromkeys(k for r in ok for k, v in r.items()
                             if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool))
        for k in (*keys, "erase_s", "peak_rss_mb"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            entry[k] = float(np.mean(vals)) if vals else None
        if suite is not None and ok and all(r.get("units") for r in ok) and method != "base":
            entry.update(intervals(suite, [r["units"] for r in ok]))
        out.append(entry)
    return out


MERGE_SHARED = ("model", "suite", "seeds_per_prompt", "options", "sweep", "methods")


def merge_results(results: list[dict[str, Any]], relabel: bool = False, first_wins: bool = False) -> dict[str, Any]:
    """Bench results of processes that split the work, as one result: all rows, means recomputed.

    By default the runs must share model, suite, seeds, options, sweep and methods, and cover disjoint concepts. With
    ``relabel`` they may differ in options (and methods): each run's rows are named ``method{key=value,...}`` after
    its options, so variants run in parallel processes become rows of one table (one base row per concept is kept).
    With ``first_wins`` a (concept, method) row that an earlier run already has is left out instead of refused (a
    rerun's table set beside an older bench that ran some of the same methods)."""
    first = results[0]
    opts = [_shared_options(r["options"]) for r in results]
    shared = [k for k in MERGE_SHARED if k != "options" and (not relabel or k not in ("methods", "sweep"))]
    for r in results[1:]:
        for key in shared:
            if r[key] != first[key]:
                raise TraceEraseError(f"the runs differ in '{key}' ({first[key]} vs {r[key]}); merge only runs made "
                                      "with the same settings")
    if not relabel and any(o != opts[0] for o in opts[1:]):
        raise TraceEraseError(f"the runs differ in 'options' ({opts[0]} vs {next(o for o in opts if o != opts[0])}); "
                              "merge only runs made with the same settings, or pass relabel")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r, o in zip(results, opts, strict=True):
        # a run that is itself a merge of differing options already names its rows
        tag = "{" + ",".join(f"{k}={v}" for k, v in sorted(o.items())) + "}" if relabel and o else ""
        for row in r["rows"]:
            name = row["method"] if row["method"] == "base" else row["method"] + tag
            if (row["concept"], name) in seen:
                if name == "base" and relabel or first_wins:
                    continue
                raise TraceEraseError(f"{row['concept']} / {name} appears in two runs; merge runs over disjoint "
                                      "--concepts (or different options, with relabel)")
            seen.add((row["concept"], name))
            rows.append({**row, "method": name})
    concepts = list(dict.fromkeys(c for r in results for c in r["concepts"]))
    merged = {**first, "concepts": concepts, "rows": rows, "means": summarize(rows, first["suite"])}
    if relabel:
        merged["options"] = opts[0] if all(o == opts[0] for o in opts) else {"per run": opts}
    return merged


def keep_concepts(result: dict[str, Any], concepts: str | None) -> dict[str, Any]:
    """A bench result cut to ``concepts`` (``dev`` / ``test``, the toy halves, or a comma list): its rows and concept
    list, e.g. the defaults' rows of an all-classes bench set beside a variant run on one half. None: unchanged."""
    if not concepts:
        return result
    from ..evaluation.suites import toy_split

    wanted = list(toy_split(concepts)) if concepts in ("dev", "test") else [c.strip() for c in concepts.split(",")]
    missing = [c for c in wanted if c not in result["concepts"]]
    if missing:
        raise TraceEraseError(f"this bench has no '{missing[0]}'; it covers {', '.join(result['concepts'])}")
    return {**result, "concepts": [c for c in result["concepts"] if c in wanted],
            "rows": [r for r in result["rows"] if r["concept"] in wanted]}


def keep_seeds(result: dict[str, Any], seeds: int | None) -> dict[str, Any]:
    """A label-suite bench result cut to its first ``seeds`` seeds (0..seeds−1; seeds are drawn in order, so a
    10-seed run's first five images are a 5-seed run's five): each row's accuracies, headline and drift recomputed
    from those seeds' units, the image statistics the units do not hold (SSIM, FID) left out, the means redone. It
    sets benches of different seed counts side by side on the same images. None: unchanged."""
    if seeds is None:
        return result
    if result["suite"] in SCENE_SUITES:
        raise TraceEraseError("seeds: scene benches are not cut by seed; merge them at their own seed count")
    have = result["seeds_per_prompt"]
    if not 1 <= seeds <= have:
        raise TraceEraseError(f"seeds must be 1..{have} for this bench (its first seeds), not {seeds}")
    rows = []
    for row in result["rows"]:
        if row["status"] != "ok" or row["method"] == "base" and not row.get("units"):
            rows.append(row)
            continue
        if not row.get("units"):
            raise TraceEraseError(f"{row['concept']} / {row['method']} has no per-seed units to cut; rerun the bench")
        kept = [u for u in row["units"] if u["seed"] < seeds]
        redone = {k: v for k, v in unit_metrics(result["suite"], kept).items() if k in row and v is not None}
        cut = {k: v for k, v in row.items() if k not in ("drift_ssim", "fid_vs_base")}
        rows.append({**cut, **redone, "units": kept})
    return {**result, "seeds_per_prompt": seeds, "rows": rows, "means": summarize(rows, result["suite"])}


def _shared_options(options: dict[str, Any]) -> dict[str, Any]:
    """A bench's options, looking through a merge whose runs all had the same ones (``{"per run": [{}, {}]}`` is
    ``{}``); a merge of differing options stays as it is (its rows are already named after them)."""
    if set(options) != {"per run"}:
        return options
    inner = [_shared_options(o) for o in options["per run"]]
    return inner[0] if all(o == inner[0] for o in inner) else {}

def write_tables(result: dict[str, Any], folder: Path) -> list[Path]:
    """``bench.md``, the figures (``tradeoff.png``, ``per_concept.png``; with matplotlib) and ``report.html``."""
    from ..evaluation.plots import bench_figures, bench_report

    table = markdown(result)
    (folder / "bench.md").write_text(table)
    figures = bench_figures(result, folder)
    bench_report(result, folder, table, figures)
    return figures


def markdown(result: dict[str, Any]) -> str:
    """The bench table (means over concepts; the suite's own columns first) and the command-relevant settings."""
    present = {k for e in result["means"] if e["status"] == "ok" for k, v in e.items() if v is not None}
    asr = [(k, f"ASR {k[4:]} ↓", 3) for k in dict.fromkeys(k for e in result["means"] for k in e)
           if k.startswith("asr_") and k in present]
    cols = [*columns(result["suite"], present), *asr, ("erase_s", "erase s", 1), ("peak_rss_mb", "peak RSS MiB", 0)]
    head = ("| method | " + " | ".join(h for _, h, _ in cols) + " |\n|" + "---|" * (len(cols) + 1) + "\n")

    def f(v: Any, d: int = 3) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    def cell(e: dict[str, Any], key: str, d: int) -> str:
        ci = e.get(f"{key}_ci95")
        return f(e.get(key), d) + (f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else "")

    lines = []
    for e in result["means"]:
        if e["status"] == "unsupported":
            lines.append(f"| {e['method']} | unsupported on this family |" + " |" * (len(cols) - 1))
            continue
        name = e["method"] + (f" ({e['failed']} failed)" if e.get("failed") else "")
        lines.append(f"| {name} | " + " | ".join(cell(e, k, d) for k, _, d in cols) + " |")
    scorer = result.get("scorer") or {}
    settings = (f"\nmodel {result['model']}, suite {result['suite']}, concepts {', '.join(result['concepts'])}, "
                f"{result['seeds_per_prompt']} seeds per prompt (0..{result['seeds_per_prompt'] - 1}), "
                f"options {result['options'] or 'method defaults'}; base row = no erasure. "
                f"Scorer: {scorer.get('name', 'toy-classifier')} {str(scorer.get('sha256') or '')[:12]}. "
                "Brackets: bootstrap 95 % intervals over concepts × seeds (evaluation/intervals.py). "
                "Peak RSS is the process peak so far (monotone across rows). Drift: erased vs base images of the "
                "retained prompts (same seeds). FID vs base (toy scorer only): torchmetrics FID with the toy "
                "classifier's features, erased vs base images of the other prompts.\n")
    reused = sorted({r["method"] for r in result.get("rows", []) if r.get("erase_reused_s")})
    if reused:
        settings += (f"\nErase s of {', '.join(reused)} includes the training time of per-concept stage-B LoRAs "
                     "reloaded from another run (e.g. multi=sum reuses the ones fuse trained), as if trained anew.\n")
    failed = [r for r in result.get("rows", []) if r.get("status") == "failed"]
    if failed:
        settings += "\nFailed runs (not in the means):\n" + "".join(
            f"- {r['concept']} / {r['method']}: {r['error']}\n" for r in failed)
    return head + "\n".join(lines) + "\n" + settings
