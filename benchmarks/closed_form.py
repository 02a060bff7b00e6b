"""Closed-form (stage A) cost on an SD-1.4-architecture UNet + CLIP-L-architecture text encoder (random weights).

Prints, per method and concept count: text-encoding time (each distinct prompt once, batched) as prompts/s, the
Gram-statistics time, the solve time (one d×d solve per stream + all 32 projections), and the process peak RSS
against the loaded models' own size. No download: the models are built from their configs.

    python benchmarks/closed_form.py [--counts 1,10,100] [--methods trace-closed-form,uce]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from _script import run, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100")
    parser.add_argument("--methods", default="trace-closed-form,uce")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trace_erase.config import Concept, config_from_dict
    from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
    from trace_erase.methods import get_method
    from trace_erase.models import get_adapter
    from trace_erase.models.builders import sd14_architecture_pipeline

    t0 = time.perf_counter()
    pipe = sd14_architecture_pipeline()
    adapter = get_adapter(pipe)
    model_bytes = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
    print(f"built SD-1.4-architecture UNet + CLIP-L text encoder in {time.perf_counter() - t0:.1f}s; "
          f"models {model_bytes / 2**30:.2f} GiB; {len(adapter.text_streams()[0].modules)} projections")
    words = ["red", "blue", "green", "cat", "dog", "car", "tree", "house", "bird", "boat"]
    rows = []
    for method in args.methods.split(","):
        spec = get_method(method)
        for n in [int(c) for c in args.counts.split(",")]:
            concepts = [Concept(f"{words[i % 10]} {words[(i // 10) % 10]} style {i}") for i in range(n)]
            cfg = config_from_dict(ClosedFormConfig, dict(spec.defaults), "options")
            engine = ClosedFormEngine(adapter, cfg, progress=False)
            start = time.perf_counter()
            result = engine.run(concepts)
            total = time.perf_counter() - start
            t = result.timings
            row = {
                "method": method, "concepts": n, "prompts": t["prompts_encoded"],
                "rows": result.counts["tokens"]["erase"],
                "encode_s": round(t["encode_s"], 2), "prompts_per_s": round(t["prompts_encoded"] / t["encode_s"], 1),
                "statistics_s": round(t["statistics_s"], 2), "solve_s": round(t["solve_s"], 3),
                "certificate_s": round(t["certificate_s"], 3), "total_s": round(total, 2),
            }
            rows.append(row)
            print(json.dumps(row))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {"model_gib": model_bytes / 2**30, "peak_rss_gib": peak / 2**30, "peak_over_models": peak / model_bytes,
               "threads": args.threads}
    print(json.dumps(summary))
    print("\n| method | concepts | prompts | erase rows | encode (prompts/s) | statistics s | solve s | cert. s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['concepts']} | {r['prompts']} | {r['rows']} | {r['encode_s']} s "
              f"({r['prompts_per_s']}/s) | {r['statistics_s']} | {r['solve_s']} | "
              f"{r['certificate_s']} |")
    print(f"\npeak RSS {summary['peak_rss_gib']:.2f} GiB = {summary['peak_over_models']:.2f}× the models' "
          f"{summary['model_gib']:.2f} GiB")
    if args.json:
        write_json(args.json, {"rows": rows, "summary": summary})


if __name__ == "__main__":
    run(main)
