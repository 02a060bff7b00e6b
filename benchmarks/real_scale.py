"""Real-architecture cost of the user's path: random-weight SD-1.4 (UNet, CLIP-L, SD VAE) at 512 px, fp32 and bf16.

Each case runs in its own process (peak RSS is per process) through the public path — ``load_model`` with a runtime
setting, ``erase``, ``generate_images`` — on a pipeline folder saved once in each dtype (so a bf16 run never holds
an fp32 copy, as a user loading a bf16 checkpoint would not):

  stage-a        ``trace-closed-form``: seconds and peak RSS
  stage-b        ``trace`` (stage A + stage B): stage-B seconds per iteration (rollouts timed apart) and peak RSS,
                 without and with gradient checkpointing; on a GPU also with ``--offload text-encoders``
  generate       one 512-px image at ``--gen-steps`` DDIM steps with CFG: seconds per image

On a CUDA machine the same script also builds an SDXL-architecture pipeline (1024 px, bf16) and records peak GPU
memory of every method and generation. No download; nothing here is a test.

    python benchmarks/real_scale.py [--iters 2] [--threads 2] [--json benchmarks/results/real_scale_cpu.json]
    python benchmarks/real_scale.py --tiny      # the same cases on a tiny fixture, in seconds (smoke run)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _script import run, write_json

CONCEPT = "a cat"
SDXL_METHODS = ("trace-closed-form", "uce", "trace", "esd-x", "esd-u", "ant")


def cases(cuda: bool, iters: int, gen_steps: int) -> list[dict[str, Any]]:
    """What to run: SD-1.4 at 512 px in fp32 and bf16 (CPU or GPU); SDXL at 1024 px per method on a GPU. On a GPU the
    user's path (bf16) comes first, so a run cut short by its time limit still holds it."""
    device = "cuda" if cuda else "cpu"
    out: list[dict[str, Any]] = []

    def sd14(dtype: str) -> None:
        base = {"arch": "sd14", "device": device, "dtype": dtype, "iters": iters}
        out.append({**base, "kind": "stage-a", "method": "trace-closed-form"})
        for gc in (False, True):
            out.append({**base, "kind": "stage-b", "method": "trace", "gradient_checkpointing": gc})
        if cuda:
            out.append({**base, "kind": "stage-b", "method": "trace", "gradient_checkpointing": False,
                        "offload": "text-encoders"})
        out.append({**base, "kind": "generate", "gen_steps": gen_steps})

    for dtype in (("bf16",) if cuda else ("fp32", "bf16")):
        sd14(dtype)
    if cuda:
        base = {"arch": "sdxl", "device": device, "dtype": "bf16", "iters": iters}
        for method in SDXL_METHODS:
            out.append({**base, "kind": "stage-b" if method not in ("trace-closed-form", "uce") else "stage-a",
                        "method": method, "gradient_checkpointing": False})
        out.append({**base, "kind": "generate", "gen_steps": gen_steps})
        sd14("fp32")
    return out


def build(arch: str, folder: Path, tiny: bool, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> None:
    """Save the architecture once per dtype in ``dtypes`` (one folder each)."""
    import torch

    from trace_erase.models.builders import sd14_architecture_pipeline, sdxl_architecture_pipeline, tiny_sd_pipeline

    if all((folder / f"{arch}-{d}" / "model_index.json").is_file() for d in dtypes):
        return
    t0 = time.perf_counter()
    # on a GPU the random initialisation runs there (seconds instead of minutes for SDXL's 3.5B parameters)
    with torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"):
        if tiny:
            pipe = tiny_sd_pipeline(0)
        else:
            pipe = sd14_architecture_pipeline(vae="sd") if arch == "sd14" else sdxl_architecture_pipeline()
    if "fp32" in dtypes:
        pipe.save_pretrained(folder / f"{arch}-fp32")
    if "bf16" in dtypes:
        pipe.to(torch.bfloat16).save_pretrained(folder / f"{arch}-bf16")
    print(f"built and saved {arch} ({'tiny' if tiny else 'real architecture'}) in {time.perf_counter() - t0:.0f}s",
          flush=True)


def run_case(case: dict[str, Any], folder: Path, threads: int, tiny: bool) -> dict[str, Any]:
    """One case in this process; returns its figures."""
    import torch

    torch.set_num_threads(threads)
    from trace_erase import erase
    from trace_erase.engines.trajectory import TrajectoryEngine
    from trace_erase.models import load_model
    from trace_erase.runtime import Runtime
    from trace_erase.sampling import generate_images

    runtime = Runtime(device=case["device"], dtype=case["dtype"], offload=case.get("offload", "none"))
    t0 = time.perf_counter()
    handle = load_model(str(folder / f"{case['arch']}-{case['dtype']}"), runtime=runtime)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0,
                           "loaded_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if case["kind"] == "generate":
        t0 = time.perf_counter()
        generate_images(handle, ["a photo of a cat"], [0], steps=case["gen_steps"], progress=False)
        out["s_per_image"] = time.perf_counter() - t0
        out["resolution"] = handle.adapter.latent_shape(1)[-1] * handle.pipe.vae_scale_factor
    else:
        rollout_s = [0.0]
        original = TrajectoryEngine.rollout

        def timed(self: Any, *a: Any, **k: Any) -> Any:  # benchmark-only: time the rollouts apart
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                rollout_s[0] += time.perf_counter() - start

        TrajectoryEngine.rollout = timed  # type: ignore[method-assign]
        options: dict[str, Any] = {}
        if case["kind"] == "stage-b":
            options = {"steps": case["iters"], "rollout_steps": 2 if not tiny else 4, "pool_trajectories": 1,
                       "checkpoint_every": 10**6, "gradient_checkpointing": case["gradient_checkpointing"]}
        er = erase(handle, [CONCEPT], method=case["method"], progress=False, **options)
        timings = er.manifest["timings"]
        parts = [timings.get(f"stage_a_{k}") for k in ("encode_s", "statistics_s", "solve_s", "certificate_s")]
        out["stage_a_s"] = sum(parts) if all(p is not None for p in parts) else None
        # where stage A's time goes: the encoders run on the device, the statistics and the float64 algebra (per
        # stream S, each projection's ΔW and WᵀW for its certificate) on the CPU; SDXL has 140 text projections
        out["stage_a_parts_s"] = dict(zip(("encode", "statistics", "solve", "certificate"), parts, strict=True))
        out["erase_wall_s"] = timings.get("wall_time_s")
        if "stage_b_s" in timings:
            out["rollout_s"] = rollout_s[0]
            out["stage_b_s_per_iter"] = (timings["stage_b_s"] - rollout_s[0]) / case["iters"]
            out["final_losses"] = er.manifest["trajectory_log"]["final_losses"]
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, d: int = 2) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    lines = ["| arch | dtype | case | stage A s | stage B s/iter | s/image | peak RSS GiB | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["kind"] + (f" {r['method']}" if "method" in r else "")
        label += " +gc" if r.get("gradient_checkpointing") else ""
        label += f" offload={r['offload']}" if r.get("offload") else ""
        label += f" ({r['gen_steps']} steps)" if r["kind"] == "generate" else ""
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['dtype']} | {label} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['dtype']} | {label} | {f(r.get('stage_a_s'), 1)} | "
                     f"{f(r.get('stage_b_s_per_iter'), 1)} | {f(r.get('s_per_image'), 1)} | "
                     f"{f(r.get('peak_rss_gib'))} | {f(r.get('peak_cuda_gib'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2, help="stage-B iterations per case")
    parser.add_argument("--gen-steps", type=int, default=4, help="sampling steps of the generation case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="out/real-scale", help="where the random-weight pipelines are saved")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--tiny", action="store_true", help="tiny fixture instead of the real architectures")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument("--arch", default=None, choices=["sd14", "sdxl"], help="run this architecture's cases only")
    parser.add_argument("--case-timeout", type=int, default=900, help="seconds before one case is stopped")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build and save one arch
    parser.add_argument("--dtypes", default="fp32,bf16", help=argparse.SUPPRESS)  # internal: with --build
    args = parser.parse_args()
    folder = Path(args.cache)
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case), folder, args.threads, args.tiny)), flush=True)
        return
    if args.build:
        build(args.build, folder, args.tiny, tuple(args.dtypes.split(",")))
        return

    import torch

    cuda = torch.cuda.is_available()
    todo = [c for c in cases(cuda, args.iters, args.gen_steps) if args.arch in (None, c["arch"])]
    # every model is built in a child process: on Linux a child's peak RSS (ru_maxrss) starts at the parent's RSS
    # when it was forked, so a parent holding a model would hide every smaller peak
    for arch in dict.fromkeys(c["arch"] for c in todo):
        dtypes = ",".join(dict.fromkeys(c["dtype"] for c in todo if c["arch"] == arch))
        subprocess.run([sys.executable, __file__, "--build", arch, "--dtypes", dtypes, "--cache", str(folder)]
                       + (["--tiny"] if args.tiny else []), check=True)
    rows: list[dict[str, Any]] = []
    summary = {"device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name() if cuda else None,
               "threads": args.threads, "iters": args.iters, "gen_steps": args.gen_steps, "tiny": args.tiny,
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "rows": rows, "complete": False}
    for case in todo:
        cmd = [sys.executable, __file__, "--case", json.dumps(case), "--cache", str(folder),
               "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            err = None if proc.returncode == 0 and lines else \
                (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            lines, err = [], f"stopped after {args.case_timeout} s"
        row = {**case, "error": err[:200]} if err else {**case, **json.loads(lines[-1][len("RESULT "):])}
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
        if args.json:  # after every case: a run stopped part-way keeps what it measured
            write_json(args.json, summary)
    fp32 = {r["kind"] + str(r.get("gradient_checkpointing")) + str(r.get("offload")): r for r in rows
            if r["arch"] == "sd14" and r["dtype"] == "fp32"}
    for r in rows:
        ref = fp32.get(r["kind"] + str(r.get("gradient_checkpointing")) + str(r.get("offload")))
        if r["dtype"] == "bf16" and r["arch"] == "sd14" and ref:
            for key in ("peak_rss_gib", "peak_cuda_gib"):
                if key in r and key in ref:
                    r[key.replace("_gib", "_vs_fp32")] = r[key] / ref[key]
    summary["complete"] = True
    print(markdown(rows))
    for r in rows:
        for key in ("peak_rss_vs_fp32", "peak_cuda_vs_fp32"):
            if key in r:
                what = "RSS" if "rss" in key else "GPU memory"
                print(f"bf16/fp32 peak {what}, {r['kind']}{' +gc' if r.get('gradient_checkpointing') else ''}"
                      f"{' offload' if r.get('offload') else ''}: {r[key]:.2f}")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    run(main)
