"""The HTML report: the suite's metrics (base vs erased), the scorer and sampler, and before/after image grids on the
same seeds. Nudity grids show blurred thumbnails unless asked otherwise (``--show-nudity``); the PNGs themselves are
in ``images/``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .metrics import columns

GROUP_NAMES = {"erased": "erased concept", "synonym": "synonym (generality)", "other": "retained",
               "composed": "composition (generality)"}


def _thumbs(folder: Path, n: int, blur: bool) -> dict[str, list[str]]:
    """Relative paths of each side's images; blurred downscaled copies (``report_files/``) when ``blur``."""
    from PIL import Image, ImageFilter

    out: dict[str, list[str]] = {}
    for side in ("base", "erased"):
        paths = [f"images/{side}/{k:05d}.png" for k in range(n)]
        if blur:
            (folder / "report_files" / side).mkdir(parents=True, exist_ok=True)
            for k, rel in enumerate(paths):
                with Image.open(folder / rel) as im:
                    small = im.convert("RGB").resize((96, 96))
                thumb = f"report_files/{side}/{k:05d}.jpg"
                small.filter(ImageFilter.GaussianBlur(8)).save(folder / thumb, quality=80)
                paths[k] = thumb
        out[side] = paths
    return out


def write_report(folder: Path, results: dict[str, Any], blur: bool = False, max_prompts: int = 40,
                 max_per_row: int = 10) -> Path:
    """``report.html`` in ``folder`` (which holds ``images/``) from the results dict of an evaluation."""
    m = results["metrics"]
    present = {k for k, v in m["erased"].items() if v is not None}
    cols = columns(results["suite"], present)
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{_fmt(m['base'].get(k), d)}</td>"
                   f"<td>{_fmt(m['erased'].get(k), d)}</td></tr>" for k, label, d in cols)
    extra = [k for k in m["erased"] if k not in {c[0] for c in cols}]
    rows += "".join(f"<tr class=minor><td>{html.escape(k)}</td><td>{_fmt(m['base'].get(k))}</td>"
                    f"<td>{_fmt(m['erased'].get(k))}</td></tr>" for k in extra)
    prompts = results["prompts"]
    thumbs = _thumbs(folder, len(prompts), blur)
    grid: dict[str, dict[str, Any]] = {}
    for k, p in enumerate(prompts):
        entry = grid.setdefault(p["prompt"], {"group": p["group"], "label": p["label"], "base": [], "erased": []})
        for side in ("base", "erased"):
            entry[side].append(thumbs[side][k])
    blocks = []
    for prompt, entry in list(grid.items())[:max_prompts]:
        def strip(paths: list[str]) -> str:
            return "".join(f'<img src="{html.escape(p)}" alt="">' for p in paths[:max_per_row])

        blocks.append(f"<h3>{html.escape(prompt)} <small>({GROUP_NAMES.get(entry['group'], entry['group'])}"
                      f"{', ' + html.escape(entry['label']) if entry['label'] else ''})</small></h3>"
                      f"<div class=row><span>base</span>{strip(entry['base'])}</div>"
                      f"<div class=row><span>erased</span>{strip(entry['erased'])}</div>")
    if len(grid) > max_prompts:
        blocks.append(f"<p>… {len(grid) - max_prompts} more prompts: all images are in <code>images/</code>.</p>")
    from .plots import eval_figures

    figures = "".join(f'<img class=fig src="{html.escape(f.name)}" alt="{html.escape(f.stem)}">'
                      for f in eval_figures(results, folder))
    s = results["settings"]
    scorer = s.get("scorer", {})
    sampler = s.get("sampler", {})
    note = ("<p class=warn>Images are blurred (nudity suite); rerun with <code>--show-nudity</code> to show them, or "
            "open <code>images/</code>.</p>") if blur else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trace-erase report</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}} tr.minor td{{color:#777;font-size:90%}}
img{{width:80px;height:80px;object-fit:cover;margin:2px}} .warn{{color:#a40}}
img.fig{{width:auto;height:auto;max-width:100%;margin:1em 0;border:1px solid #eee}}
.row{{display:flex;align-items:center}} .row span{{width:60px;color:#666}}
pre{{background:#f6f6f6;padding:1em;font-size:12px}}
</style></head><body>
<h1>Erasure report: {html.escape(str(results['concept']) or results['suite'])} — {html.escape(str(results['method']))}
</h1>
<p>model <b>{html.escape(str(results['model']))}</b>, suite <b>{html.escape(results['suite'])}</b>
({len(prompts)} images per side; same seeds before and after), scorer <b>{html.escape(str(scorer.get('name')))}</b>
<small>{html.escape(str(scorer.get('sha256') or '')[:12])}</small>, sampler {html.escape(str(sampler.get('scheduler')))}
{sampler.get('steps')} steps, guidance {sampler.get('guidance')}, {sampler.get('resolution')} px.</p>
<table><tr><th>metric</th><th>base</th><th>erased</th></tr>{rows}</table>
{figures}{note}{''.join(blocks)}
<h2>Settings</h2><pre>{html.escape(json.dumps(s, indent=2))}</pre></body></html>"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def _fmt(v: Any, decimals: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{decimals}f}"
    return html.escape(str(v))
