"""Closed-form fusion at SD-1.4 dimensions: 1, 10, 100 concepts, rank-4 stage-B LoRAs already trained.

The pipeline has the SD-1.4 UNet and a CLIP-L-sized text encoder with random weights; the per-concept LoRAs are
random rank-4 factors on every attn2.to_k/to_v (timing does not depend on what they learned). For each N this
gathers every concept's token statistics in one encoding pass (what stage A reads as well) and solves stage A, then
fuses the N LoRAs (one d×d solve per stream, the rank-4N LoRA per module), writes the fused LoRA and loads it with
plain diffusers ``load_lora_weights``. Printed: encode/statistics, stage-A solve, fusion seconds, peak RSS against
the model's size, the fused rank, and the largest |W* − (W + B·A)| of the loaded adapter against the fusion's dense
result. Nothing here is a test.

    python benchmarks/many_concepts.py [--counts 1,10,100] [--templates 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from _script import run, write_json
from safetensors.torch import save_file

from trace_erase.artifacts.lora import pairs_to_state
from trace_erase.config import make_concepts
from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
from trace_erase.engines.fusion import FusionInputs, fuse
from trace_erase.models import get_adapter
from trace_erase.models.builders import sd14_architecture_pipeline

TEMPLATES = ["{}", "a photo of {}", "a painting of {}", "an image of {}", "a close-up of {}", "{} in the street"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,10,100")
    p.add_argument("--templates", type=int, default=4, help="prompt templates per concept (the default is ~30)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    pipe = sd14_architecture_pipeline()
    adapter = get_adapter(pipe)
    model_mb = sum(t.numel() * t.element_size() for c in (pipe.unet, pipe.text_encoder)
                   for t in c.state_dict().values()) / 2**20
    cfg = ClosedFormConfig(templates=TEMPLATES[:args.templates], preserve_corpus="builtin")
    engine = ClosedFormEngine(adapter, cfg, progress=False)
    stream = engine.streams[0]
    modules = stream.modules
    rows = []
    for n in (int(x) for x in args.counts.split(",")):
        concepts = make_concepts([f"thing{i}" for i in range(n)])
        t0 = time.perf_counter()
        per, joint = engine.concept_statistics(concepts)
        t1 = time.perf_counter()
        engine.run(concepts, stats=joint)
        t2 = time.perf_counter()
        g = torch.Generator().manual_seed(n)
        factors = []
        for _ in range(n):
            f = {}
            for m in modules:
                w = adapter.module(m).weight
                f[m] = (torch.randn(args.rank, w.shape[1], generator=g) * 0.01,  # float32, as trained
                        torch.randn(w.shape[0], args.rank, generator=g) * 0.01)
            factors.append(f)
        inputs = FusionInputs(factors, dict.fromkeys(modules, stream.name),
                              [{stream.name: s[stream.name].g_e} for s in per], {stream.name: joint[stream.name].g_p})
        t3 = time.perf_counter()
        fused, _, _ = fuse(inputs, 0.1, 1.0)
        fuse_s = time.perf_counter() - t3
        state = pairs_to_state(fused, "unet")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pytorch_lora_weights.safetensors"
            save_file(state, str(path))
            lora_mb = path.stat().st_size / 2**20
            pipe.load_lora_weights(tmp, adapter_name=f"fused{n}")
        layer = pipe.unet.get_submodule(modules[0])
        loaded = (layer.lora_B[f"fused{n}"].weight.double() @ layer.lora_A[f"fused{n}"].weight.double()
                  * layer.scaling[f"fused{n}"])
        a, b = fused[modules[0]]
        err = float((loaded - b @ a).abs().max())
        pipe.delete_adapters(f"fused{n}")
        pipe.unload_lora_weights()
        rows.append({"concepts": n, "templates": args.templates, "encode_statistics_s": t1 - t0,
                     "stage_a_solve_s": t2 - t1, "fusion_s": fuse_s, "fused_rank": int(a.shape[0]),
                     "lora_mb": lora_mb, "peak_rss_mb": rss_mb(), "model_mb": model_mb,
                     "loaded_max_abs_diff": err})
        print(f"N={n}: encode+statistics {t1 - t0:.1f}s, stage-A solve {t2 - t1:.2f}s, fusion {fuse_s:.2f}s, "
              f"rank {a.shape[0]}, LoRA {lora_mb:.1f} MiB, peak RSS {rss_mb():.0f} MiB "
              f"({rss_mb() / model_mb:.2f}× the {model_mb:.0f} MiB model), diffusers-loaded max |Δ| {err:.1e}",
              flush=True)
    if args.json:
        write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    run(main)
