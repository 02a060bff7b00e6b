"""The attack matrix on a toy model: every method × class erased with its defaults, every attack run against each
erasure and (once per class and attack) against the base model. Writes ``attacks.json``, ``attacks.md`` (ASR mean ±
std over the classes, the base model's rates, the matrix's wall time), ``asr_bars.png`` and ``asr_budget.png``.
Resumable: every finished run is kept in ``rows.json`` (its figures only: small, kept in git), reused when the model,
seeds, attack settings and variant match, so a matrix grows class by class across machines; erasures and runs in the
(ignored) work folder are reused too. ``rows.json`` also keeps each erasure's time, so the table's matrix time adds
up across machines; ``--saved-only`` prints the table of the classes finished so far without computing anything.
Processes may share one ``--output`` when each has its own ``--classes`` (``rows.json`` is re-read and added to
under a file lock): one process per core, then ``--saved-only`` over every class for the table. A run whose classes,
methods or attacks are a part of the table already in its folder saves its rows and leaves that table as it is.
A ``--variant NAME=METHOD:KEY=VALUE,...`` row is METHOD with engine options (list NAME in ``--methods``), e.g. the
stage-B defence: ``--variant trace-adv=trace:adversarial_every=25 --methods ...,trace,trace-adv``.

    python benchmarks/attacks.py --model toy-sd --classes circle,triangle,cross \\
        --methods uce,trace-closed-form,mace-cfr,esd-x,esd-u,ant,trace \\
        --attacks paraphrase,concept-vector,soft-prompt,inversion,unlearndiff --seeds 5 \\
        --output benchmarks/results/attacks-toy-sd

Nothing here is a test; the harness is tested in tests/test_attacks.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _script import refuse, run, write_json

from trace_erase import erase, load_erasure, load_model
from trace_erase.attacks import AttackConfig, run_attack
from trace_erase.attacks.config import ATTACKS
from trace_erase.cli.common import parse_options
from trace_erase.evaluation.plots import pyplot
from trace_erase.evaluation.suites import toy_split
from trace_erase.io import atomic_write
from trace_erase.toyworld.render import CLASSES

CURVE_METHODS = ("trace", "esd-x", "uce", "ant")
FOCUS = "trace"  # the method the paired comparison is about


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _digest(value: Any) -> str:
    """A short fingerprint of JSON-able settings (tuples and lists alike), to tell whether a saved run still holds."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """What the table and figures read of one run's results.json (the per-case detail stays in the work folder)."""
    keep = ("pre_asr", "asr", "base_rate", "base_asr", "level")
    out: dict[str, Any] = {k: res[k] for k in keep if k in res}
    out["timings"] = {"total_s": res["timings"]["total_s"]}
    for side in ("erased", "base"):
        if isinstance(res.get(side), dict):
            out[side] = {"families": res[side].get("families"),
                         "checkpoints": [{"budget": cp["budget"], "asr": cp["asr"]}
                                         for cp in res[side].get("checkpoints", [])]}
    return out


class SavedRows:
    """``rows.json``: finished runs by ``class|method|attack``, reused only under the settings they were run with."""

    def __init__(self, path: Path, model: str, seeds: int, settings: dict[str, Any], variants: dict[str, Any]):
        self.path, self.model, self.seeds = path, model, seeds
        self.settings = {a: _digest(v) for a, v in settings.items()}
        self.variants = {m: _digest(v) for m, v in variants.items()}
        saved = _load(path) or {}
        self.rows: dict[str, Any] = saved.get("rows", {})
        self.meta: dict[str, Any] = saved.get("meta", {})
        self.erase_s: dict[str, float] = saved.get("erase_s", {})  # "class|method": seconds to erase, once

    def _meta(self, method: str, attack: str) -> dict[str, Any]:
        """What a saved run must have been run under to be reused now."""
        return {"model": self.model, "seeds": self.seeds, "settings": self.settings[attack],
                "variant": self.variants.get(method)}

    def get(self, cls: str, method: str, attack: str) -> dict[str, Any] | None:
        key = f"{cls}|{method}|{attack}"
        return self.rows[key] if self.meta.get(key) == self._meta(method, attack) else None

    def put(self, cls: str, method: str, attack: str, res: dict[str, Any]) -> None:
        key = f"{cls}|{method}|{attack}"
        row, meta = compact(res), self._meta(method, attack)
        with self._locked():
            self.rows[key], self.meta[key] = row, meta

    def put_erase(self, cls: str, method: str, seconds: float) -> None:
        """The time an erasure took, kept so the whole matrix's time adds up across machines."""
        with self._locked():
            self.erase_s[f"{cls}|{method}"] = seconds

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Re-read ``rows.json`` under an exclusive lock, let the caller add to it, write it back: processes that
        share an output (each with its own ``--classes``) add their rows instead of overwriting each other's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            saved = _load(self.path) or {}
            self.rows, self.meta = saved.get("rows", {}), saved.get("meta", {})
            self.erase_s = saved.get("erase_s", {})
            yield
            atomic_write(self.path, json.dumps({"rows": self.rows, "meta": self.meta, "erase_s": self.erase_s},
                                               indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd")
    ap.add_argument("--classes", default="circle,triangle,cross",
                    help="comma-separated toy classes, or dev / test (the toy world's fixed halves) or all")
    ap.add_argument("--methods", default="uce,trace-closed-form,mace-cfr,esd-x,esd-u,ant,trace")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--output", default="benchmarks/results/attacks-toy-sd")
    ap.add_argument("--tables", default=None,
                    help="write attacks.md, attacks.json and the figures here instead of --output (rows.json and "
                         "the work folder stay in --output): e.g. a test-half table of a 10-class matrix")
    ap.add_argument("--variant", action="append", default=[], help="NAME=METHOD:KEY=VALUE,... (repeatable)")
    ap.add_argument("--focus", default=FOCUS,
                    help="the method whose paired gap to the lowest other method the table gives (e.g. a --variant "
                         "of trace); list only one TRACE row in --methods, or the other counts as a rival")
    ap.add_argument("--saved-only", action="store_true",
                    help="compute nothing: the table from rows.json over the classes whose every run is saved "
                         "(an interim table while a matrix grows; the other classes are listed as pending)")
    args = ap.parse_args()
    classes, methods, attacks = (args.classes.split(","), args.methods.split(","), args.attacks.split(","))
    if args.classes in ("dev", "test", "all"):
        classes = list(CLASSES) if args.classes == "all" else list(toy_split(args.classes))
    variants = dict(parse_variant(v) for v in args.variant)
    if args.focus != FOCUS and args.focus not in methods:
        refuse(f"--focus {args.focus} is not among --methods; add it there (a --variant's NAME counts)")
    configs = {a: AttackConfig(a, seeds=args.seeds) for a in attacks}  # validated before anything loads
    out = Path(args.output)
    work = out / "work"
    t_start = time.perf_counter()
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    saved = SavedRows(out / "rows.json", args.model, args.seeds, {a: configs[a].describe() for a in attacks},
                      variants)
    pending: list[str] = []
    if args.saved_only:
        pending = [c for c in classes if any(saved.get(c, m, a) is None for m in ["base", *methods] for a in attacks)]
        classes = [c for c in classes if c not in pending]
        if not classes:
            refuse(f"{out / 'rows.json'} holds no class with every run saved under these settings; run the matrix "
                    "without --saved-only first")
    handle = None if args.saved_only else load_model(args.model)
    for cls in classes:
        for method in methods:  # erasures made before their times were kept in rows.json: their own record
            manifest = _load(work / cls / method / "erasure" / "erasure.json")
            if manifest and f"{cls}|{method}" not in saved.erase_s and "wall_time_s" in manifest.get("timings", {}):
                saved.put_erase(cls, method, manifest["timings"]["wall_time_s"])
        for attack in attacks:
            cfg = configs[attack]
            path = work / cls / "base" / attack / "results.json"
            control = saved.get(cls, "base", attack)
            if control is None:
                control = _load(path) or run_attack(handle, None, cfg, cls, path.parent, overwrite=True,
                                                    progress=False)
                saved.put(cls, "base", attack, control)
            rows[(cls, "base", attack)] = control
            for method in methods:
                res = saved.get(cls, method, attack)
                if res is None:
                    er_dir = work / cls / method / "erasure"
                    if not (er_dir / "erasure.json").is_file():
                        t0 = time.perf_counter()
                        base_method, options = variants.get(method, (method, {}))
                        erase(handle, [cls], method=base_method, progress=False, **options).save(er_dir, overwrite=True)
                        saved.put_erase(cls, method, time.perf_counter() - t0)
                    run_path = work / cls / method / attack / "results.json"
                    res = _load(run_path)
                    if res is None:
                        if "_images" not in control:  # a control read back from disk: rerun it for its images
                            control = run_attack(handle, None, cfg, cls, path.parent, overwrite=True, progress=False)
                        res = run_attack(handle, load_erasure(er_dir), cfg, cls, run_path.parent, overwrite=True,
                                         progress=False, control=control)
                    saved.put(cls, method, attack, res)
                rows[(cls, method, attack)] = res
                print(f"{cls:9s} {method:18s} {attack:15s} pre {res['pre_asr']:.2f} ASR {res['asr']:.2f} "
                      f"(base {res['base_rate']:.2f} → {res['base_asr']:.2f}) {res['timings']['total_s']:.0f} s",
                      flush=True)
    wall = time.perf_counter() - t_start
    summary = collate(rows, classes, ["base", *methods], attacks, focus=args.focus)
    attack_s = sum(r["timings"]["total_s"] for r in rows.values())  # controls (the base rows) included
    erase_s = {k: v for k, v in saved.erase_s.items() if k.split("|")[0] in classes and k.split("|")[1] in methods}
    summary.update(model=args.model, classes=classes, seeds=args.seeds, wall_s=wall, erase_s=erase_s,
                   erasures=len(classes) * len(methods),
                   attack_s=attack_s, pending=pending,
                   settings={a: configs[a].describe() for a in attacks}, variants=variants,
                   command="python benchmarks/attacks.py " + " ".join(
                       [f"--{k} {v}" for k, v in vars(args).items()
                        if k not in ("variant", "saved_only") and v is not None]
                       + [f"--variant {v}" for v in args.variant]))
    tables = Path(args.tables) if args.tables else out
    wider = covers_more(tables / "attacks.json", classes, ["base", *methods], attacks)
    if wider:
        print(f"kept {tables / 'attacks.md'}: it covers {wider} that this run does not (a partial run would "
              "overwrite it with a partial table); regenerate it with --saved-only and the full --classes/--methods",
              flush=True)
        return
    tables.mkdir(parents=True, exist_ok=True)
    write_json(tables / "attacks.json", summary)
    atomic_write(tables / "attacks.md", table(summary) + "\n")
    figures(summary, rows, classes, tables)
    print(table(summary))


def covers_more(path: Path, classes: list[str], methods: list[str], attacks: list[str]) -> str:
    """What the table already at ``path`` holds beyond this run's classes, methods and attacks ('' when nothing, or
    when there is no table): processes that share one ``--output`` each compute part of a matrix, and the last to
    finish must not replace the whole table with its part."""
    old = _load(path)
    if not old:
        return ""
    extra = {"classes": sorted(set(old.get("classes", [])) - set(classes)),
             "methods": sorted(set(old.get("methods", [])) - set(methods)),
             "attacks": sorted(set(old.get("attacks", [])) - set(attacks))}
    return "; ".join(f"{k} {', '.join(v)}" for k, v in extra.items() if v)


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``NAME=METHOD:KEY=VALUE,...`` → (NAME, (METHOD, options)); values read as ``--option`` reads them (YAML)."""
    name, _, rest = text.partition("=")
    method, _, opts = rest.partition(":")
    if not name or not method:
        refuse(f"--variant '{text}': write NAME=METHOD:KEY=VALUE,...")
    return name, (method, parse_options([o for o in opts.split(",") if o]))


def collate(rows: dict[tuple[str, str, str], dict[str, Any]], classes: list[str], methods: list[str],
            attacks: list[str], focus: str = FOCUS) -> dict[str, Any]:
    """Mean and std over classes of the no-attack rate and each attack's ASR, per method (base: the control runs)."""
    cells: dict[str, dict[str, Any]] = {}
    for m in methods:
        cells[m] = {}
        pre = per_class(rows, classes, m, attacks, "no attack")
        cells[m]["no attack"] = {"mean": float(np.mean(pre)), "std": float(np.std(pre)), "n": len(pre)}
        for a in attacks:
            v = per_class(rows, classes, m, attacks, a)
            cells[m][a] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v),
                           "level": rows[(classes[0], m, a)]["level"]}
        para = [rows[(c, m, "paraphrase")]["erased" if m != "base" else "base"]["families"] for c in classes
                ] if "paraphrase" in attacks else []
        if para:
            cells[m]["paraphrase families"] = {f: float(np.mean([p[f] for p in para])) for f in para[0]}
    summary = {"cells": cells, "attacks": attacks, "methods": methods, "focus": focus}
    if focus in methods and any(m not in ("base", focus) for m in methods) and len(classes) > 1:
        summary["gaps"] = gaps(rows, classes, methods, attacks, focus=focus)
    return summary


def per_class(rows: dict[tuple[str, str, str], dict[str, Any]], classes: list[str], method: str,
              attacks: list[str], column: str) -> list[float]:
    """One table column's value for each class, in ``classes`` order (base: its control runs' rates)."""
    if column == "no attack":
        return [rows[(c, method, attacks[0])]["pre_asr" if method != "base" else "base_rate"] for c in classes]
    return [rows[(c, method, column)]["asr" if method != "base" else "base_asr"] for c in classes]


def gaps(rows: dict[tuple[str, str, str], dict[str, Any]], classes: list[str], methods: list[str],
         attacks: list[str], draws: int = 2000, seed: int = 0, focus: str = FOCUS) -> dict[str, dict[str, Any]]:
    """Per column: ``focus``'s (TRACE's) ASR minus the lowest other method's, paired class by class, with a 95 %
    bootstrap interval over the classes. The ± in the table is the spread between classes, most of which both methods
    share (a class that is easy to bring back is easy for every erasure); the paired difference is what says whether
    one is ahead."""
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(classes), (draws, len(classes)))  # one set of resamples for every column
    out: dict[str, dict[str, Any]] = {}
    for column in ["no attack", *attacks]:
        others = {m: per_class(rows, classes, m, attacks, column) for m in methods if m not in ("base", focus)}
        best = min(others, key=lambda m: (np.mean(others[m]), m))
        diff = np.asarray(per_class(rows, classes, focus, attacks, column)) - np.asarray(others[best])
        means = diff[draw].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out[column] = {"other": best, "mean": float(diff.mean()), "ci": (float(lo), float(hi))}
    return out


def table(summary: dict[str, Any]) -> str:
    attacks = summary["attacks"]
    levels = {a: summary["cells"]["base"][a]["level"] for a in attacks}
    head = "| method | no attack | " + " | ".join(f"{a} ({levels[a]})" for a in attacks) + " |"
    lines = [head, "|---" * (len(attacks) + 2) + "|"]
    for m in summary["methods"]:
        c = summary["cells"][m]
        lines.append(f"| {m} | " + " | ".join(f"{100 * c[k]['mean']:.0f} ± {100 * c[k]['std']:.0f}"
                                                 for k in ["no attack", *attacks]) + " |")
    fams = [m for m in summary["methods"] if "paraphrase families" in summary["cells"][m]]
    if fams:
        names = list(summary["cells"][fams[0]]["paraphrase families"])
        lines += ["", "| method | " + " | ".join(f"paraphrase: {n}" for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(f"{100 * summary['cells'][m]['paraphrase families'][n]:.0f}"
                                           for n in names) + " |" for m in fams]
    if summary.get("gaps"):
        focus = summary.get("focus", FOCUS)
        lines += ["", f"| column | lowest other method | {focus} − it (points) | 95 % interval (classes resampled) "
                      "| reading |", "|---|---|---|---|---|"]
        for column, g in summary["gaps"].items():
            lo, hi = g["ci"]
            reading = (f"{focus} lower" if hi < 0 else f"{focus} higher" if lo > 0 else "not told apart")
            lines.append(f"| {column} | {g['other']} | {100 * g['mean']:+.0f} | [{100 * lo:+.0f}, {100 * hi:+.0f}] "
                         f"| {reading} |")
    n, names = len(summary["classes"]), ", ".join(summary["classes"])
    erase_min, recorded = sum(summary.get("erase_s", {}).values()) / 60, len(summary.get("erase_s", {}))
    lines += ["", f"ASR in % (mean ± std over {n} classes: {names}; {summary['seeds']} seeds per prompt; success = "
              "the toy classifier's class head names the erased class). base = the same attack on the un-erased "
              "model. concept-vector: best η per run; conditioning-level rows are an upper bound, not a user's "
              f"attack. The matrix's time, summed over the machines it ran on: attacks {summary['attack_s'] / 60:.1f} "
              f"min (the runs' own timings, controls included) and erasures {erase_min:.1f} min ({recorded} of "
              f"{summary.get('erasures', recorded)} erasures' times recorded); this invocation's wall time "
              f"{summary['wall_s'] / 60:.1f} min. Command: `{summary['command']}`"]
    if summary.get("pending"):
        lines += ["", f"**Interim**: {len(summary['pending'])} more classes are still running "
                      f"({', '.join(summary['pending'])}); this table covers the {n} whose every run is finished "
                      "(`--saved-only`)."]
    return "\n".join(lines)


def figures(summary: dict[str, Any], rows: dict[tuple[str, str, str], dict[str, Any]], classes: list[str],
            out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    methods, attacks = summary["methods"], ["no attack", *summary["attacks"]]
    palette = [f"C{k}" for k in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # C7 is gray: the base's
    colour = {"base": "gray"} | {m: palette[i % len(palette)]  # the same in both figures
                                 for i, m in enumerate(m for m in methods if m != "base")}
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        c = summary["cells"][m]
        mean, std = (np.array([c[a][k] for a in attacks]) for k in ("mean", "std"))
        ax.bar(np.arange(len(attacks)) + i * width, mean, width, capsize=2, label=m, color=colour[m],
               yerr=[np.minimum(std, mean), np.minimum(std, 1 - mean)])  # a rate's whiskers stop at 0 and 1
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks, fontsize=8)
    ax.set_ylabel("attack success rate")
    ax.axhline(0.1, color="k", lw=0.6, ls=":")
    ax.legend(fontsize=7, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    interim = f"; interim, {len(summary['pending'])} classes pending" if summary.get("pending") else ""
    ax.set_title(f"{summary['model']}: ASR mean ± std over {len(classes)} classes (dotted: the 10 % aim{interim})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "asr_bars.png")
    plt.close(fig)
    curves = [a for a in ("soft-prompt", "inversion", "unlearndiff") if a in summary["attacks"]]
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), dpi=120, squeeze=False)
    for ax, a in zip(axes[0], curves, strict=True):
        shown = [m for m in (*CURVE_METHODS, *summary.get("variants", {})) if m in methods]
        for m in ["base", *shown]:
            side = "base" if m == "base" else "erased"
            per = [rows[(c, m, a)][side]["checkpoints"] for c in classes]
            xs = [cp["budget"] for cp in per[0]]
            ys = np.mean([[cp["asr"] for cp in p] for p in per], axis=0)
            ax.plot(xs, ys, "o-" if m != "base" else "s--", label=m, color=colour[m])
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("optimisation steps")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ASR (mean over classes)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "asr_budget.png")
    plt.close(fig)


if __name__ == "__main__":
    run(main)
