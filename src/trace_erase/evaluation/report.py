"""The HTML report: the suite's metrics (base vs erased, with intervals where the results carry them), the scorer and
sampler, and before/after image grids on the same seeds (scene suites: base/erased pairs, the two slots labelled).
Nudity grids show blurred thumbnails unless asked otherwise (``--show-nudity``); the PNGs themselves are in
``images/``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..errors import TraceEraseError
from .metrics import columns

GROUP_NAMES = {"erased": "erased concept", "synonym": "synonym (generality)", "other": "retained",
               "composed": "composition (generality)", "alone": "target alone", "control": "other alone (control)",
               "pair": "two non-targets", "stress": "shared colour and style"}


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
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{_cell(m['base'], k, d)}</td>"
                   f"<td>{_cell(m['erased'], k, d)}</td></tr>" for k, label, d in cols)
    extra = [k for k in m["erased"] if k not in {c[0] for c in cols} and not k.endswith("_ci95")]
    rows += "".join(f"<tr class=minor><td>{html.escape(k)}</td><td>{_cell(m['base'], k)}</td>"
                    f"<td>{_cell(m['erased'], k)}</td></tr>" for k in extra)
    if any(k.endswith("_ci95") for k in m["erased"]):
        rows += "<tr class=minor><td colspan=3>brackets: bootstrap 95 % intervals over seeds</td></tr>"
    prompts = results["prompts"]
    thumbs = _thumbs(folder, len(prompts), blur)
    if any(p.get("sides") for p in prompts):
        blocks = scene_blocks(results, thumbs)
    else:
        blocks = _prompt_blocks(prompts, thumbs, max_prompts, max_per_row)
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
pre{{background:#f6f6f6;padding:1em;font-size:12px}}{SCENE_CSS}
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


def _prompt_blocks(prompts: list[dict[str, Any]], thumbs: dict[str, list[str]], max_prompts: int,
                   max_per_row: int) -> list[str]:
    """Per prompt: its base and erased images in two rows (same seeds)."""
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
    return blocks


SCENE_CSS = """
.pairs{display:flex;flex-wrap:wrap;gap:10px} .pair{border:1px solid #ddd;padding:6px;width:290px;font-size:12px}
.pair p{margin:0 0 4px} .slots{display:flex;justify-content:space-between;color:#555}
.pair figure{margin:2px 0;display:flex;align-items:center;gap:6px}
.pair figure img{width:128px;height:64px;image-rendering:pixelated;object-fit:fill;margin:0}
.pic{position:relative;line-height:0} .pic:after{content:"";position:absolute;left:50%;top:0;bottom:0;
border-left:1px dashed rgba(255,255,255,.7)} .t{color:#a40} .o{color:#06a}"""


def scene_blocks(results: dict[str, Any], thumbs: dict[str, list[str]], per_group: int = 8) -> list[str]:
    """Scene suites: per prompt group, base/erased pairs of the same seed, each slot labelled with what the prompt
    put there (the target's slot, the other object's) and what the scorer saw in it."""
    from ..toyworld.scenes.captions import parse_caption
    from .scene_suite import GROUPS

    def prompted(text: str) -> dict[str, str]:
        try:
            sides = parse_caption(text).sides
        except TraceEraseError:  # a label is a courtesy; the metrics never read it
            return {}
        return {side: (obj.cls if obj else "empty") for side, obj in sides.items()}

    blocks = []
    prompts, per_image = results["prompts"], results.get("per_image") or []
    for group in GROUPS:
        ks = [k for k, p in enumerate(prompts) if p["group"] == group][:per_group]
        if not ks:
            continue
        cards = []
        for k in ks:
            p = prompts[k]
            target, other = p["sides"]
            what = prompted(p["prompt"])
            head = (f"<div class=slots><span class=t>{target}: target slot ({html.escape(what.get(target, 'empty'))})"
                    f"</span><span class=o>{other}: other slot ({html.escape(what.get(other, 'empty'))})</span></div>")
            figs = ""
            for side in ("base", "erased"):
                seen = (per_image[k].get(side) or {}) if k < len(per_image) else {}
                saw = " · ".join(f"{s[0].upper()} {html.escape(str((seen.get(s) or {}).get('class', '?')))}"
                                 for s in ("left", "right"))
                figs += (f'<figure><span class=pic><img src="{html.escape(thumbs[side][k])}" alt=""></span>'
                         f"<figcaption>{side}, seed {p['seed']}<br>{saw}</figcaption></figure>")
            cards.append(f"<div class=pair><p>{html.escape(p['prompt'])}</p>{head}{figs}</div>")
        blocks.append(f"<h3>{html.escape(GROUP_NAMES.get(group, group))}</h3><div class=pairs>{''.join(cards)}</div>")
    return blocks


def _cell(metrics: dict[str, Any], key: str, decimals: int = 4) -> str:
    """A metric's value, with its interval in brackets where the results carry one."""
    ci = metrics.get(f"{key}_ci95")
    return _fmt(metrics.get(key), decimals) + (f" [{ci[0]:.{decimals}f}, {ci[1]:.{decimals}f}]" if ci else "")


def _fmt(v: Any, decimals: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{decimals}f}"
    return html.escape(str(v))
