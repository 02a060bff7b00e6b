"""The HTML report: settings, metrics (base vs erased) and before/after image grids on the same seeds."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def write_report(folder: Path, results: dict[str, Any], grid: list[dict[str, Any]], max_per_row: int = 10) -> Path:
    """``grid``: one dict per prompt (prompt, group, base/erased image paths relative to ``folder``)."""
    m = results["metrics"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(m['base'].get(k))}</td><td>{_fmt(m['erased'].get(k))}</td></tr>"
        for k in m["erased"]
    )
    blocks = []
    for entry in grid:
        def strip(paths: list[str]) -> str:
            return "".join(f'<img src="{html.escape(p)}" alt="">' for p in paths[:max_per_row])

        blocks.append(
            f"<h3>{html.escape(entry['prompt'])} <small>({entry['group']})</small></h3>"
            f"<div class=row><span>base</span>{strip(entry['base'])}</div>"
            f"<div class=row><span>erased</span>{strip(entry['erased'])}</div>"
        )
    settings = html.escape(json.dumps(results["settings"], indent=2))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>trace-erase report</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}} img{{width:64px;height:64px;image-rendering:pixelated;margin:2px}}
.row span{{display:inline-block;width:60px;color:#666}} pre{{background:#f6f6f6;padding:1em;font-size:12px}}
</style></head><body>
<h1>Erasure report: {html.escape(str(results['concept']))} — {html.escape(str(results['method']))}</h1>
<p>model <b>{html.escape(str(results['model']))}</b>, suite <b>{html.escape(results['suite'])}</b>,
{results['settings']['seeds_per_prompt']} seeds per prompt; same seeds before and after.</p>
<table><tr><th>metric</th><th>base</th><th>erased</th></tr>{rows}</table>
{''.join(blocks)}
<h2>Settings</h2><pre>{settings}</pre></body></html>"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else html.escape(str(v)))
