"""``bench --concept-counts 1,2,5,8``: quality against the number of erased concepts on the toy world
(docs/many-concepts.md).

For N = 1 every class is erased alone (the singletons give Acc_e(c | {c}) for the interference term); for each
larger N, ``subsets`` fixed subsets drawn with a seeded RNG (listed in the results). Each concept set is one
:func:`~trace_erase.benchmark.bench.run_bench` over the methods (its folder under ``N{n}/``, resumable), with
per-class seeds shrinking as 1/N so the erased set holds about as many images at every N, as MACE's protocol does.
Per method and N: Acc_e, Acc_s, Acc_g, H_o, drift (means over the subsets), the worst erased class's Acc_e, and
interference Δ_int = mean over c ∈ S of Acc_e(c | S) − Acc_e(c | {c}).

Two things are not run twice. At N = 1 a sweep run that only sets ``multi`` is the method's own erasure (one concept
has nothing to combine), so its rows are the method's. And the singletons may come from an existing bench of every
class alone (``singletons``: its ``bench.json``, same model, seeds and options), e.g. the side-by-side table's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceEraseError
from ..evaluation.suites import load_class_set
from ..io import run_folder
from .bench import run_bench, run_label

KEYS = ("acc_e", "acc_s", "acc_g", "h_o", "drift_l2")


def parse_counts(text: str) -> list[int]:
    """``"1,2,5,8"`` → [1, 2, 5, 8]; one line when a count is not an integer in 1…9 (10 toy classes)."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise TraceEraseError(f"--concept-counts '{text}' must list concept counts, e.g. 1,2,5,8") from None
    if not counts or counts[0] < 1 or counts[-1] > 9:
        raise TraceEraseError(f"--concept-counts must be between 1 and 9 (the toy world has 10 classes), not '{text}'")
    return counts


def concept_sets(classes: list[str], counts: list[int], subsets: int, seed: int = 0) -> dict[int, list[list[str]]]:
    """Every singleton for N = 1 (when 1 is among ``counts``: the interference column needs them, a fusion choice
    does not); ``subsets`` distinct seeded subsets per N > 1. A draw that repeats an earlier subset is drawn again
    (a repeat would be the same run twice, counted as two sets); the first subsets are the same as before that rule,
    as long as none of them repeated. ``classes`` is the pool the sets are drawn from (all toy classes, or one half
    of them)."""
    for n in counts:
        if n > len(classes):
            raise TraceEraseError(f"--concept-counts {n}: the pool has only {len(classes)} classes; drop N = {n} or "
                                  "draw from all classes")
    out = {1: [[c] for c in classes]} if 1 in counts else {}
    for n in counts:
        if n > 1:
            possible = math.comb(len(classes), n)
            if subsets > possible:
                raise TraceEraseError(f"--subsets {subsets}: there are only {possible} distinct sets of {n} of the "
                                      f"{len(classes)} classes; lower --subsets or drop N = {n} from --concept-counts")
            rng = random.Random(seed * 1000 + n)
            groups: list[list[str]] = []
            while len(groups) < subsets:
                group = sorted(rng.sample(classes, n))
                if group not in groups:
                    groups.append(group)
            out[n] = groups
    return out


def per_class_acc_e(results: dict[str, Any]) -> dict[str, float]:
    """Acc_e of each erased class from one run's per-image judgements (the eval figure's erased-group bars)."""
    from ..evaluation.plots import per_label_means

    return {label: erased for group, label, _, erased in per_label_means(results) if group == "erased"}


def singleton_rows(path: str | Path, model: str, seeds: int,
                   options: dict[str, Any] | None) -> dict[str, dict[str, dict[str, Any]]]:
    """class → method → row, from a bench of single classes (``bench.json``) run with the same model, seeds per prompt
    and options as this multi bench; one line naming the mismatch otherwise."""
    file = Path(path)
    file = file / "bench.json" if file.is_dir() else file
    try:
        bench = json.loads(file.read_text())
        rows = bench["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TraceEraseError(f"--singletons '{path}' is not a bench.json with rows (the output of trace-erase "
                              "bench)") from None
    expected = {"model": model, "suite": "toy-objects", "seeds_per_prompt": seeds, "options": options or {}}
    for key, want in expected.items():
        if bench.get(key) != want:
            raise TraceEraseError(f"--singletons '{path}' has {key} {bench.get(key)!r}, this bench {want!r}; the "
                                  "singletons must come from the same model, suite, seeds and options")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok" and "," not in row["concept"]:
            out.setdefault(row["concept"], {})[row["method"]] = row
    return out


def run_multi_bench(handle: Any, methods: list[str], counts: list[int], output: str | Path, subsets: int = 5,
                    seeds: int = 10, singletons: str | Path | None = None, pool: list[str] | None = None,
                    preserve_retained: bool = False, **bench_kwargs: Any) -> dict[str, Any]:
    """Run the benches of every concept set and write ``multi.json``, ``multi.md`` and ``multi.png`` (each set's
    bench is committed as it finishes: ``resume=True`` skips the finished ones). ``pool``: draw the sets from these
    classes (e.g. the development half; default all); ``preserve_retained``: every method is asked to keep the
    toy classes its set does not erase (``erase(preserve=...)``), the same list for each."""
    import shutil

    from ..io import atomic_write

    out = Path(output)
    resume, overwrite = bench_kwargs.pop("resume", False), bench_kwargs.pop("overwrite", False)
    if out.exists() and not resume:
        if not overwrite:
            raise TraceEraseError(f"bench output folder '{out}' already exists; pass --resume to continue it or "
                                  "--overwrite to start afresh")
        shutil.rmtree(out)
    classes = list(load_class_set("toy").classes)
    sets = concept_sets(list(pool or classes), counts, subsets)
    sweep = list(bench_kwargs.pop("sweep", None) or [])
    sweep_labels = [run_label("trace", e) for e in sweep]
    labels = [*methods, *sweep_labels]
    # at N = 1, sweep runs that only choose the combination (multi, the fusion's options) are trace's own erasure:
    # copied, not rerun
    from ..engines.sub_configs import FusionConfig

    combination = {"multi", *FusionConfig.KEYS.values()}
    aliases = [lb for lb, e in zip(sweep_labels, sweep, strict=True) if set(e) <= combination] \
        if "trace" in methods else []
    alone = singleton_rows(singletons, handle.source, seeds, bench_kwargs.get("options")) if singletons else {}
    rows = []
    for n, groups in sets.items():
        per_seed = max(1, round(seeds / n))
        for k, group in enumerate(groups):
            folder = out / f"N{n}" / f"set{k}"
            if n == 1:
                reused = alone.get(group[0], {})
                todo = [m for m in methods if m not in reused]
                todo_sweep = [e for lb, e in zip(sweep_labels, sweep, strict=True)
                              if lb not in aliases and lb not in reused]
            else:
                reused, todo, todo_sweep = {}, methods, sweep
            kept = [c for c in classes if c not in group] if preserve_retained else None
            found = _set_rows(handle, folder, group, todo, todo_sweep, per_seed, resume,
                              {**bench_kwargs, **({"preserve": kept} if kept else {})})
            found += [(row, {group[0]: row["acc_e"]}) for row in reused.values()]
            by_label = {row["method"]: (row, per_class) for row, per_class in found if row.get("status") == "ok"}
            if n == 1 and "trace" in by_label:
                by_label.update({a: by_label["trace"] for a in aliases})
            for label in [m for m in ("base", *labels) if m in by_label]:
                row, per_class = by_label[label]
                rows.append({"n": n, "set": group, "method": label, "seeds": per_seed,
                             **{key: row.get(key) for key in KEYS}, "per_class_acc_e": per_class,
                             **({"from": str(singletons)} if label in reused else {})})
    summary = summarize_multi(rows, counts)
    result = {"model": handle.source, "counts": counts, "subsets": {str(n): g for n, g in sets.items()},
              "seeds_at_n1": seeds, "singletons": str(singletons) if singletons else None,
              **({"pool": list(pool)} if pool else {}), **({"preserve_retained": True} if preserve_retained else {}),
              "aliases_at_n1": aliases, "rows": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "multi.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "multi.md", markdown_multi(result))
    multi_figure(result, out)
    return result


SET_ROWS = "set_rows.json"  # a finished set's rows and per-class Acc_e: small, kept in git, enough to resume from


def _set_rows(handle: Any, folder: Path, group: list[str], methods: list[str], sweep: list[dict[str, Any]],
              seeds: int, resume: bool, bench_kwargs: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """One concept set's bench rows (run now, or read when already committed), each with Acc_e per erased class.

    A finished set leaves ``set_rows.json`` beside its bench; it alone is enough to resume from, so a run's finished
    sets can be committed without their images and erasures and continued on another machine."""
    from ..io import atomic_write

    if not methods and not sweep:
        return []
    if (folder / SET_ROWS).is_file():
        saved = json.loads((folder / SET_ROWS).read_text())
        if saved.get("group") != group:
            raise TraceEraseError(f"{folder} holds the set {','.join(saved.get('group') or [])}, not "
                                  f"{','.join(group)}; move that folder away (its sets were drawn differently)")
        return [(e["row"], e["per_class_acc_e"]) for e in saved["rows"]]
    if (folder / "bench.json").is_file():
        result = json.loads((folder / "bench.json").read_text())
        held = {row["concept"] for row in result["rows"]}
        if held != {",".join(group)}:
            raise TraceEraseError(f"{folder} holds a bench of {', '.join(sorted(held))}, not {','.join(group)}; "
                                  "move that folder away (its sets were drawn differently)")
    else:
        result = run_bench(handle, methods, [",".join(group)], folder, suite="toy-objects", seeds=seeds,
                           resume=resume, sweep=sweep, **bench_kwargs)
    found = []
    for row in result["rows"]:
        run = run_folder(folder, row["concept"], row["method"]) / "results.json"
        found.append((row, per_class_acc_e(json.loads(run.read_text())) if run.is_file() else {}))
    atomic_write(folder / SET_ROWS, json.dumps({"group": group, "rows": [
        {"row": row, "per_class_acc_e": per_class} for row, per_class in found]}, indent=1) + "\n")
    return found


def summarize_multi(rows: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Means per (method, N), the worst erased class, and interference against the singletons."""
    alone: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["n"] == 1:
            for c, v in r["per_class_acc_e"].items():
                alone[(r["method"], c)] = v
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for n in counts:
            mine = [r for r in rows if r["method"] == method and r["n"] == n]
            if not mine:
                continue
            entry: dict[str, Any] = {"method": method, "n": n, "sets": len(mine)}
            for key in KEYS:
                vals = [r[key] for r in mine if r.get(key) is not None]
                entry[key] = float(np.mean(vals)) if vals else None
            worst = [max(r["per_class_acc_e"].values()) for r in mine if r["per_class_acc_e"]]
            entry["worst_acc_e"] = float(np.mean(worst)) if worst else None
            deltas = [v - alone[(method, c)] for r in mine for c, v in r["per_class_acc_e"].items()
                      if (method, c) in alone]
            entry["interference"] = float(np.mean(deltas)) if deltas and n > 1 else (0.0 if n == 1 else None)
            out.append(entry)
    return out


def markdown_multi(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| method | N | sets | Acc_e ↓ | worst Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ | drift ↓ | interference ↓ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        lines.append(f"| {e['method']} | {e['n']} | {e['sets']} | {f(e['acc_e'])} | {f(e['worst_acc_e'])} | "
                     f"{f(e['acc_s'])} | {f(e['acc_g'])} | {f(e['h_o'])} | {f(e['drift_l2'])} | "
                     f"{f(e['interference'])} |")
    lines.append("")
    lines.append(f"Subsets: {json.dumps(result['subsets'])}; per-class seeds {result['seeds_at_n1']} at N = 1, "
                 "÷ N above (a near-constant erased-set image count). Interference: mean over c ∈ S of "
                 "Acc_e(c | S) − Acc_e(c | {c}).")
    if result.get("singletons"):
        lines.append(f"N = 1 rows from `{result['singletons']}` (each class alone, same model, seeds and options).")
    if result.get("preserve_retained"):
        lines.append("Every method was asked to keep the classes its set does not erase (`--preserve-retained`).")
    if result.get("aliases_at_n1"):
        lines.append(f"At N = 1, {', '.join(result['aliases_at_n1'])} = trace's own erasure (one concept: nothing to "
                     "combine), not rerun.")
    return "\n".join(lines) + "\n"


def multi_figure(result: dict[str, Any], folder: Path) -> Path | None:
    """``multi.png``: H_o and Acc_s against N, one line per method."""
    from ..evaluation.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=120)
    methods = [m for m in dict.fromkeys(e["method"] for e in result["summary"]) if m != "base"]
    for i, m in enumerate(methods):
        pts = [e for e in result["summary"] if e["method"] == m]
        for ax, key in zip(axes, ("h_o", "acc_s"), strict=True):
            ax.plot([e["n"] for e in pts], [e[key] for e in pts], marker="o", label=m, color=f"C{i % 10}")
    for ax, label in zip(axes, ("H_o (higher is better)", "Acc_s on retained classes (higher is better)"),
                         strict=True):
        ax.set_xlabel("erased concepts N")
        ax.set_ylabel(label)
        ax.set_xticks(result["counts"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: erasing N toy classes at once", fontsize=9)
    fig.tight_layout()
    path = folder / "multi.png"
    fig.savefig(path)
    plt.close(fig)
    return path
