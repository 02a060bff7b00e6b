"""How much of a concept stage A leaves, read from the denoiser on the concept's own training prompts — no images,
no classifier — set beside the bench's measured Acc_e of the same erasures.

For each erasure (a bench run folder holding ``erasure/`` and ``results.json``), trajectories of the original model
under the concept's training prompts (its stage-A templates filled with the concept) are rolled out as the pipeline
samples; at every state x_t the concept's direction Δ = ε(x_t, concept prompt) − ε(x_t, anchor prompt) is read under
the original model and under the erasure, and

    residual = Σ ‖Δ_erased‖² / Σ ‖Δ_original‖²

over the early and the late half of the trajectory (τ 0.5 in the adapter's time): 0 when the erased model treats the
concept prompt as its anchor, 1 when it is untouched. The question it answers: does a label-free quantity that a
method may compute at erase time predict where stage A fails in images (so that stage B could engage there)?

    python benchmarks/stage_a_residual.py --model toy-sd --runs out/bench/runs/*/trace-closed-form \
        --output benchmarks/results/stage-a-residual-toy-sd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _script import refuse, run, write_json


def concept_direction(adapter: Any, states: list[tuple[Any, Any]], cond: Any, anchor: Any) -> list[float]:
    """‖ε(x, cond) − ε(x, anchor)‖² at each state (batched by state)."""
    import torch

    out = []
    with torch.no_grad():
        for x, t in states:
            d = adapter.predict(x, t, cond) - adapter.predict(x, t, anchor)
            out.append(float((d.float() ** 2).sum()))
    return out


def residuals(handle: Any, folder: Path, seeds: int, steps: int, templates: int, tau: float) -> dict[str, Any]:
    """The early and late residual of the erasure in ``folder`` on its concept's first ``templates`` templates."""
    import torch

    from trace_erase.artifacts.erasure import load_erasure, remove_erasures
    from trace_erase.engines.prompts import DEFAULT_TEMPLATES
    from trace_erase.models.denoise import denoise

    adapter = handle.adapter
    erasure = load_erasure(folder / "erasure")
    concept = erasure.manifest["concepts"][0]
    chosen = (erasure.manifest.get("config", {}).get("closed_form") or {}).get("templates") or DEFAULT_TEMPLATES
    chosen = list(chosen)[:templates]
    prompts = [" ".join(t.format(concept["name"]).split()) for t in chosen]
    anchors = [" ".join(t.format(concept["anchor"]).split()) for t in chosen]
    guidance = float(handle.defaults.get("guidance_scale", 7.5))
    remove_erasures(handle)
    uncond = adapter.conditioning([""])
    states: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (x_in, t, prompt index)
    gen = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(prompts):
        cond = adapter.conditioning([prompt])
        for _ in range(seeds):
            scheduler = adapter.rollout_scheduler(steps)
            x = adapter.initial_noise(scheduler, torch.randn(adapter.latent_shape(1), generator=gen))
            denoise(adapter, scheduler, x, cond, uncond, guidance, gen,
                    lambda x_in, tm, i=i: states.append((x_in.detach().clone(), tm.detach().clone(), i)))
    conds = [adapter.conditioning([p]) for p in prompts]
    anchor_conds = [adapter.conditioning([a]) for a in anchors]

    def directions() -> list[float]:
        return [concept_direction(adapter, [(x, t)], conds[i], anchor_conds[i])[0] for x, t, i in states]

    before = directions()
    erasure.apply(handle)
    conds = [adapter.conditioning([p]) for p in prompts]  # a text-encoder LoRA changes the conditioning too
    anchor_conds = [adapter.conditioning([a]) for a in anchors]
    after = directions()
    remove_erasures(handle)
    late = [bool(adapter.is_late(t, tau).all()) for _, t, _ in states]
    out: dict[str, Any] = {"concept": concept["name"], "method": erasure.manifest.get("method"),
                           "prompts": len(prompts), "states": len(states)}
    for name, keep in (("early", [not v for v in late]), ("late", late), ("all", [True] * len(late))):
        num = sum(a for a, k in zip(after, keep, strict=True) if k)
        den = sum(b for b, k in zip(before, keep, strict=True) if k)
        out[f"residual_{name}"] = num / den if den > 0 else None
        # how far the original model tells the concept prompt from its anchor, per state (label-free too)
        out[f"gap_{name}"] = den / max(sum(keep), 1)
    results = folder / "results.json"
    if results.is_file():
        out["acc_e"] = json.loads(results.read_text())["metrics"]["erased"].get("acc_e")
    return out


def anchor_draws(handle: Any, templates: int, seeds: int) -> dict[str, Any]:
    """What the original model draws for the anchor prompts (the stage-A templates with the concept taken out): the
    toy classifier's class shares over ``seeds`` images a prompt. An erasure that maps a concept onto its anchor
    cannot remove a class that the anchor itself draws."""
    import collections

    import numpy as np

    from trace_erase.artifacts.erasure import remove_erasures
    from trace_erase.engines.prompts import DEFAULT_TEMPLATES
    from trace_erase.evaluation.scorers.toy import HEAD_LABELS, ToyScorer
    from trace_erase.sampling import generate_images

    remove_erasures(handle)
    prompts = list(dict.fromkeys(" ".join(t.format("").split()) for t in DEFAULT_TEMPLATES[:templates]))
    pairs = [(p, s) for p in prompts for s in range(seeds)]
    images = generate_images(handle, [p for p, _ in pairs], [s for _, s in pairs], progress=False)
    pred = ToyScorer().model.predict(np.asarray(np.stack([np.asarray(im) for im in images])))["class"]
    counts = collections.Counter(HEAD_LABELS["class"][int(k)] for k in pred)
    return {"prompts": prompts, "seeds": seeds,
            "shares": {c: counts.get(c, 0) / len(pairs) for c in HEAD_LABELS["class"]}}


def figure(folder: Path, path: Path, n: int = 10) -> None:
    """The run's first ``n`` erased-prompt images under the erasure (top row) and the base model (bottom row)."""
    from PIL import Image

    prompts = json.loads((folder / "results.json").read_text())["prompts"]
    idx = [i for i, p in enumerate(prompts) if p["group"] == "erased"][:n]
    size = 96
    sheet = Image.new("RGB", (size * len(idx), 2 * size), "white")
    for row, which in enumerate(("erased", "base")):
        for k, i in enumerate(idx):
            im = Image.open(folder / "images" / which / f"{i:05d}.png").convert("RGB")
            sheet.paste(im.resize((size, size), Image.NEAREST), (k * size, row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--runs", nargs="+", required=True, help="bench run folders, each with erasure/")
    parser.add_argument("--seeds", type=int, default=2, help="trajectories per training prompt")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of each trajectory")
    parser.add_argument("--templates", type=int, default=8, help="the first N of the concept's stage-A templates")
    parser.add_argument("--tau", type=float, default=0.5, help="the early/late edge in the adapter's time")
    parser.add_argument("--output", required=True)
    parser.add_argument("--figure", nargs=2, metavar=("RUN", "PNG"),
                        help="also tile RUN's erased-prompt images, erased (top) over base (bottom), into PNG")
    args = parser.parse_args()
    folders = [Path(r) for r in args.runs]
    missing = [str(f) for f in folders if not (f / "erasure" / "erasure.json").is_file()]
    if missing:
        refuse(f"{missing[0]} holds no erasure/erasure.json; pass bench run folders (OUTPUT/runs/CONCEPT/METHOD)")
    if args.figure and not (Path(args.figure[0]) / "images" / "erased").is_dir():
        refuse(f"--figure {args.figure[0]} holds no images/erased; pass one of the bench run folders")
    if args.seeds < 1 or args.steps < 2 or args.templates < 1:
        refuse("--seeds and --templates must be ≥ 1 and --steps ≥ 2")

    from tqdm import tqdm

    from trace_erase.models import load_model

    if args.figure:
        figure(Path(args.figure[0]), Path(args.figure[1]))
    handle = load_model(args.model)
    draws = anchor_draws(handle, args.templates, args.seeds * 5) if args.model.startswith("toy-") else None
    if draws:
        print("the anchor prompts draw: " + ", ".join(f"{c} {v:.2f}" for c, v in draws["shares"].items() if v))
    rows = [residuals(handle, f, args.seeds, args.steps, args.templates, args.tau)
            for f in tqdm(folders, desc="erasures")]
    for r in rows:
        print(f"{r['concept']:10s} {r['method']:18s} early {r['residual_early']:.3f} late {r['residual_late']:.3f} "
              f"all {r['residual_all']:.3f} gap early {r['gap_early']:.1f} late {r['gap_late']:.1f} "
              f"Acc_e {r.get('acc_e')}")
    write_json(args.output, {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "output"},
                             "rows": rows, "anchor_draws": draws})
    return 0


if __name__ == "__main__":
    run(main)
