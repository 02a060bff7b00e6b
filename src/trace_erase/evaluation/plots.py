"""Figures of a bench, for people who would rather look than read: the headline metric against drift (one point per
method, with its bootstrap interval) and the headline metric per concept; and the bench's own report.html.

matplotlib is the optional ``plots`` extra; without it the bench still writes its tables and says how to get the
figures.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..io import file_label, run_folder
from .intervals import HEADLINE
from .metrics import SUITE_COLUMNS

LABELS = {"h_o": "H_o (higher is better)", "h_c": "H_c (higher is better)", "h_s": "H_s (higher is better)",
          "drift_l2": "drift L2 on retained "
          "prompts (lower is better)"}


def headline_key(suite: str) -> str:
    """The metric a suite's figures rank by: H_o / H_c / H_s, else the suite's first column."""
    return HEADLINE.get(suite) or SUITE_COLUMNS[suite][0][0]


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None without the optional ``plots`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bench_figures(result: dict[str, Any], folder: Path) -> list[Path]:
    """``tradeoff.png`` and ``per_concept.png`` in ``folder``; [] when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return []
    key = headline_key(result["suite"])
    means = [e for e in result["means"] if e["status"] == "ok" and e.get(key) is not None]
    out = []
    if means and any(e.get("drift_l2") is not None for e in means):
        fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
        for i, e in enumerate(m for m in means if m["method"] != "base"):
            if e.get("drift_l2") is None:  # base (no erasure: H 0, drift 0) is left out: it squashes the axes
                continue
            x, y = e["drift_l2"], e[key]
            xe = _err(x, e.get("drift_l2_ci95"))
            ye = _err(y, e.get(f"{key}_ci95"))
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, color=f"C{i % 10}")
            ax.annotate(e["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(LABELS["drift_l2"])
        ax.set_ylabel(LABELS.get(key, key))
        ax.set_title(f"{result['model']} · {result['suite']} · {len(result['concepts'])} concepts "
                     "(bars: bootstrap 95 % intervals)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / "tradeoff.png"
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    rows = [r for r in result.get("rows", []) if r.get("status") == "ok" and r.get(key) is not None]
    methods = [e["method"] for e in means if e["method"] != "base"]
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    if methods and concepts:
        width = 0.8 / len(methods)
        fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(concepts) * max(1, len(methods) / 3)), 4.2), dpi=120)
        for i, m in enumerate(methods):
            vals = {r["concept"]: r[key] for r in rows if r["method"] == m}
            xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(concepts))]
            ax.bar(xs, [vals.get(c, 0.0) for c in concepts], width, label=m, color=f"C{i % 10}")
        ax.set_xticks(range(len(concepts)), concepts, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(LABELS.get(key, key))
        ax.legend(fontsize=7, ncol=min(4, len(methods)))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = folder / "per_concept.png"
        fig.savefig(path)
        plt.close(fig)
        out.append(path)
    return out


GROUP_ORDER = ("erased", "synonym", "composed", "other")
MAX_BARS = 30


def _image_value(item: dict[str, Any], judgement: dict[str, Any]) -> float | None:
    """One number per image: correct (label suites), the score (styles, coco) or exposed parts (nudity)."""
    if "label" in judgement:
        return float(judgement["label"] == item.get("label"))
    if "score" in judgement:
        return float(judgement["score"])
    if "exposed" in judgement:
        return float(judgement["exposed"])
    return None


def per_label_means(results: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(group, label, base mean, erased mean) per prompt group and label, erased group first (at most 30)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for item, judged in zip(results["prompts"], results.get("per_image") or [], strict=False):
        key = (item["group"], str(item.get("label") or item["group"]))
        for side in ("base", "erased"):
            v = _image_value(item, judged.get(side, {}))
            if v is not None:
                values.setdefault(key, {"base": [], "erased": []})[side].append(v)
    keys = sorted(values, key=lambda k: (GROUP_ORDER.index(k[0]) if k[0] in GROUP_ORDER else 9, k[1]))[:MAX_BARS]
    return [(g, label, *(sum(values[(g, label)][s]) / max(len(values[(g, label)][s]), 1) for s in ("base", "erased")))
            for g, label in keys]


def eval_figures(results: dict[str, Any], folder: Path) -> list[Path]:
    """``per_label.png``: base vs erased per prompt group and label (accuracy, score or exposed parts) — where the
    erasure acted and what it spared, at a glance; [] without matplotlib or per-image judgements."""
    plt = pyplot()
    bars = per_label_means(results)
    if plt is None or not bars:
        return []
    first = results["per_image"][0]["base"]
    ylabel = "accuracy" if "label" in first else ("score" if "score" in first else "exposed parts per image")
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(bars) + 2), 4.2), dpi=120)
    xs = list(range(len(bars)))
    for i, side in enumerate(("base", "erased")):
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], [b[2 + i] for b in bars], 0.4, label=side,
               color="C7" if side == "base" else "C3")
    names = {"erased": "erased", "synonym": "synonym", "composed": "composed", "other": "retained"}
    ax.set_xticks(xs, [f"{b[1]}\n({names.get(b[0], b[0])})" for b in bars], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{results['suite']} · {results['method']} · erased '{results['concept']}' (same seeds)", fontsize=9)
    top = max(max(b[2], b[3]) for b in bars)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # headroom: the legend sits above the tallest bar
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = folder / "per_label.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def _err(value: float, ci: list[float] | None) -> list[list[float]] | None:
    return None if not ci else [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def bench_report(result: dict[str, Any], folder: Path, table_md: str, figures: list[Path]) -> Path:
    """``report.html`` of a bench: the figures, the table and links to each run's own report."""
    lines = [ln for ln in table_md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")] if lines else []
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
             + "</table>")
    notes = "".join(f"<p>{html.escape(ln)}</p>" for ln in table_md.splitlines()[len(lines):] if ln.strip())
    figs = "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in figures) or (
        "<p>No figures: install the plots extra (<code>pip install 'trace-erase[plots]'</code>).</p>")
    runs = "".join(f'<li><a href="runs/{html.escape(r["concept"])}/{html.escape(file_label(r["method"]))}/report.html">'
                   f'{html.escape(r["concept"])} / {html.escape(r["method"])}</a></li>'
                   for r in result.get("rows", []) if r.get("status") == "ok"
                   and (run_folder(folder, r["concept"], r["method"]) / "report.html").is_file())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trace-erase bench</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px}} img{{max-width:100%;margin:8px 8px 0 0;border:1px solid #eee}}
</style></head><body><h1>Bench: {html.escape(str(result['model']))} · {html.escape(result['suite'])}</h1>
{figs}<h2>Means over concepts</h2>{table}{notes}<h2>Runs</h2><ul>{runs}</ul></body></html>"""
    path = folder / "report.html"
    path.write_text(page)
    return path
