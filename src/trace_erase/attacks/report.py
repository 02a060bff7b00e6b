"""An attack's report.html: the ASR table (erased vs base, no attack vs attacked), the ASR-against-budget curve, and
image strips (erased with no attack, erased attacked, base attacked) on the same seeds; and the matrix figures of
``benchmarks/attacks.py`` (grouped ASR bars, budget curves per method)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..evaluation.plots import pyplot


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def curve_figure(results: dict[str, Any], folder: Path) -> Path | None:
    """``asr_curve.png``: ASR at each budget point, erased and base (None without matplotlib or with one point)."""
    plt = pyplot()
    er, base = results["erased"]["checkpoints"], results["base"]["checkpoints"]
    if plt is None or len(er) < 2:
        return None
    x_key = "eta" if results["attack"] == "concept-vector" else "budget"

    def xs(cps: list[dict[str, Any]]) -> list[float]:
        return [c["detail"]["eta"] if x_key == "eta" else c["budget"] for c in cps]

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    ax.plot(xs(er), [c["asr"] for c in er], "o-", label=f"erased ({results['method']})")
    ax.plot(xs(base), [c["asr"] for c in base], "s--", color="gray", label="base model")
    ax.axhline(results["pre_asr"], color="C0", lw=0.8, ls=":", label="erased, no attack")
    ax.set_xlabel("η" if x_key == "eta" else results["settings"]["attack"]["budget_unit"])
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{results['attack']} ({results['level']} level) on '{results['concept']}'", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "asr_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_attack_report(folder: Path, results: dict[str, Any], per_row: int = 10) -> Path:
    """``report.html`` in ``folder`` (which holds ``images/``) from an attack's results dict."""
    er, base = results["erased"], results["base"]
    rows = (f"<tr><td>erased model ({html.escape(results['method'])})</td><td>{_pct(results['pre_asr'])}</td>"
            f"<td><b>{_pct(results['asr'])}</b></td><td>{_pct(results['asr_union'])}</td></tr>"
            f"<tr><td>base model (control)</td><td>{_pct(results['base_rate'])}</td>"
            f"<td>{_pct(results['base_asr'])}</td><td>{_pct(base.get('asr_union'))}</td></tr>")
    fams = ""
    if er.get("families"):
        fams = "<h2>Per family</h2><table><tr><th>family</th><th>erased</th><th>base</th></tr>" + "".join(
            f"<tr><td>{html.escape(f)}</td><td>{_pct(v)}</td><td>{_pct((base.get('families') or {}).get(f))}</td>"
            "</tr>" for f, v in er["families"].items()) + "</table>"
    curve = curve_figure(results, folder)
    fig = f'<img class=fig src="{curve.name}" alt="ASR against budget">' if curve else ""

    def strip(side: str, cases: list[dict[str, Any]], title: str) -> str:
        blocks, by_prompt = [], {}
        for k, c in enumerate(cases):
            by_prompt.setdefault(c["prompt"], []).append((k, c))
        for prompt, items in list(by_prompt.items())[:6]:
            imgs = "".join(f'<img src="images/{side}/{k:05d}.png" class="{"hit" if c["success"] else ""}" '
                           f'title="{html.escape(json.dumps(c["judgement"]))}" alt="">' for k, c in items[:per_row])
            blocks.append(f"<div class=row><span>{html.escape(prompt)}</span>{imgs}</div>")
        return f"<h3>{title}</h3>" + "".join(blocks)

    strips = (strip("pre", er["pre_cases"], "erased model, no attack")
              + strip("attacked", er["checkpoints"][er["best_index"]]["cases"], "erased model, attacked")
              + strip("base_attacked", base["checkpoints"][base["best_index"]]["cases"],
                      "base model, attacked (control)"))
    s = results["settings"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trace-erase attack report</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}} img{{width:64px;height:64px;margin:2px;border:3px solid #fff}}
img.hit{{border-color:#c33}} img.fig{{width:auto;height:auto;border:1px solid #eee}}
.row{{display:flex;align-items:center}} .row span{{width:320px;font-size:12px;color:#555}}
pre{{background:#f6f6f6;padding:1em;font-size:12px}} .note{{color:#555}}
</style></head><body>
<h1>Attack report: {html.escape(results['attack'])} on '{html.escape(results['concept'])}' —
{html.escape(results['method'])}</h1>
<p>model <b>{html.escape(str(results['model']))}</b>; level <b>{html.escape(results['level'])}</b>
({html.escape(s['attack']['level_note'])}); budget {s['attack']['budget']} {html.escape(s['attack']['budget_unit'])};
{s['attack']['seeds']} evaluation seeds per prompt; scorer <b>{html.escape(str(s['scorer'].get('name')))}</b>;
success = {html.escape(s['success'])}.</p>
<table><tr><th></th><th>no attack</th><th>attacked (ASR)</th><th>pre ∪ attacked</th></tr>{rows}</table>
{fams}{fig}
<p class=note>Red borders: images the scorer labels as the concept.</p>{strips}
<h2>Settings</h2><pre>{html.escape(json.dumps({**s, 'timings': results['timings']}, indent=2))}</pre>
</body></html>"""
    path = folder / "report.html"
    path.write_text(page)
    return path
