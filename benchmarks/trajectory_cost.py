"""Stage-B cost on an SD-1.4-architecture UNet (random weights): per-iteration time and peak RSS.

Setups, each in its own process (peak RSS is per process):
  trace         — our TRACE stage B at its SD defaults: LoRA on K/V, frozen branch = same UNet with the adapter
                  disabled, states from the replay pool, trained branches (c, ∅) backpropagated one at a time
  trace-batched — the same with both trained branches in one call (``branches=batched``)
  esd-x         — our ESD-x: the same engine (one trained branch, no L_unc)
  two-copy      — ESD-style memory layout as in the original repos: a frozen deepcopy of the UNet beside the trained
                  one (full fine-tuning of cross-attention, as ESD-x does); states given, not sampled
  esd-original  — two-copy plus what the original ESD does every iteration: DDIM-sample x_t with the trained UNet
                  (classifier-free guidance) from noise to a random step of 50 — on average 25 guided calls.
                  Derived, not run: two-copy's s/iteration + 25 × the measured time of one guided call (batch 2)
  trace-gc      — trace with gradient checkpointing

    python benchmarks/trajectory_cost.py [--iters 3] [--threads 2] \
        [--setups trace,trace-batched,esd-x,two-copy,trace-gc]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

from _script import run, write_json


def run_setup(setup: str, iters: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from trace_erase.api import method_configs
    from trace_erase.config import Concept
    from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
    from trace_erase.methods import get_method
    from trace_erase.models import get_adapter
    from trace_erase.models.builders import sd14_architecture_pipeline

    pipe = sd14_architecture_pipeline()
    adapter = get_adapter(pipe)
    model_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    method = "esd-x" if setup == "esd-x" else "trace"
    opts = method_configs(get_method(method), {}, "sd")[1].options()  # the method's defaults on SD
    opts.update(steps=iters, rollout_steps=4, pool_trajectories=1, batch_size=1, checkpoint_every=10**9,
                gradient_checkpointing=setup == "trace-gc",
                branches="batched" if setup == "trace-batched" else "sequential")
    engine = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**opts), progress=False)
    concepts = [Concept("van gogh")]
    sample_call_s = None
    if setup == "two-copy":
        frozen = copy.deepcopy(pipe.unet).requires_grad_(False)
        unet = pipe.unet
        unet.requires_grad_(False)
        params = [p for n, p in unet.named_parameters() if "attn2" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-5)
        cond = adapter.conditioning(["van gogh", ""])
        times = []
        calls = []
        with torch.no_grad():  # one guided sampling call as ESD makes 25 of per iteration (on average)
            ctx = cond.tensors["encoder_hidden_states"]
            x = torch.randn(adapter.latent_shape(1))
            for _ in range(3):
                start = time.perf_counter()
                unet(torch.cat([x, x]), torch.tensor([500, 500]), encoder_hidden_states=ctx)
                calls.append(time.perf_counter() - start)
        sample_call_s = min(calls)
        for _ in range(iters + 1):
            x = torch.randn(adapter.latent_shape(1))
            t = torch.tensor([500])
            start = time.perf_counter()
            with torch.no_grad():
                ctx = cond.tensors["encoder_hidden_states"]
                e = frozen(torch.cat([x, x]), t.repeat(2), encoder_hidden_states=ctx).sample
            target = e[1:] - (e[:1] - e[1:])
            pred = unet(x, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"][:1]).sample
            loss = (pred - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        per_iter = sum(times[1:]) / iters
    else:
        engine.concepts = concepts  # the anchor reference reads the training prompt's concept
        engine.attach()
        params = engine.lora_parameters()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        x = torch.randn(adapter.latent_shape(1))
        times = []
        for i in range(iters + 1):
            t = torch.tensor([300 if i % 2 else 700])
            start = time.perf_counter()
            opt.zero_grad()
            engine.loss_terms(x, t, ["van gogh"], [], backward_scale=1.0)
            opt.step()
            times.append(time.perf_counter() - start)
        per_iter = sum(times[1:]) / iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setup": setup, "per_iter_s": per_iter, "sample_call_s": sample_call_s, "peak_rss_gib": peak / 2**30,
            "unet_gib": model_bytes / 2**30,
            "threads": threads, "iters": iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setups", default="trace,trace-batched,esd-x,two-copy,trace-gc")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_setup(args.child, args.iters, args.threads)))
        return
    rows = []
    for setup in args.setups.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", setup, "--iters", str(args.iters),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["setup"]: r for r in rows}
    if "two-copy" in by:
        two = by["two-copy"]
        row = {**two, "setup": "esd-original", "per_iter_s": two["per_iter_s"] + 25 * two["sample_call_s"],
               "derived": "two-copy + 25 guided sampling calls"}
        rows.append(row)
        by["esd-original"] = row
        print(json.dumps(row), flush=True)
    print("\n| setup | s / iteration | peak RSS GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['per_iter_s']:.2f} | {r['peak_rss_gib']:.2f} |")
    if "trace" in by and "two-copy" in by:
        print(f"\ntrace / two-copy: time {by['trace']['per_iter_s'] / by['two-copy']['per_iter_s']:.2f}×, "
              f"peak RSS {by['trace']['peak_rss_gib'] / by['two-copy']['peak_rss_gib']:.2f}×")
    for other in ("trace-batched", "esd-x", "esd-original"):
        if "trace" in by and other in by:
            print(f"trace / {other}: time {by['trace']['per_iter_s'] / by[other]['per_iter_s']:.2f}×, "
                  f"peak RSS {by['trace']['peak_rss_gib'] / by[other]['peak_rss_gib']:.2f}×")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    run(main)
