"""Cost of one toy denoiser step for a recipe: forward FLOPs per sample and seconds per training step.

The 90-minute training bar is a compute budget; this prints what a recipe's denoiser (with its text encoders, trained
jointly) costs before anyone spends 40 minutes training it. FLOPs come from ``torch.utils.flop_counter`` (one sample,
forward); seconds are the median of ``--steps`` forward+backward+AdamW steps at the recipe's batch size on random
latents and real captions, through the trainer's own forward code. The training loop adds caption sampling, gradient
clipping and the EMA update on top (a few per cent).

    python benchmarks/toy_denoiser_cost.py --family sd [--set widths=24,48,96] [--steps 10] [--threads 2] \\
        [--json benchmarks/results/toy_denoiser_cost_sd.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _script import run, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sd", "flux"], required=True)
    parser.add_argument("--set", dest="assignments", action="append", default=[], help="recipe setting KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after two warm-up steps); 0: FLOPs only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro", action="store_true", help="micro sizes (tests)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trace_erase.toyworld.components import assemble_pipeline, build_components, trained_components
    from trace_erase.toyworld.config import override, preset
    from trace_erase.toyworld.train import ToyTrainer

    cfg = override(preset(args.family, micro=args.micro), args.assignments)  # bad --set: run() prints one line
    torch.set_num_threads(args.threads)
    parts = build_components(cfg)
    pipe = assemble_pipeline(cfg, parts, (0.0, 1.0))
    params = [p for n in trained_components(cfg.family) for p in parts[n].parameters()]  # what training optimises
    side = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    captions = ["a red striped circle", "a photo of a dotted star", "", "a blue house on grey"]

    def forward(batch: int) -> torch.Tensor:
        z = torch.randn(batch, cfg.latent_channels, side, side)
        caps = [captions[i % len(captions)] for i in range(batch)]
        if cfg.family == "flux":
            return ToyTrainer._flux_forward(pipe, z, torch.rand(batch), caps) - z  # noqa: SLF001 (the real forward)
        ids = pipe.tokenizer(caps, padding="max_length", max_length=cfg.max_tokens, truncation=True,
                             return_tensors="pt").input_ids
        return pipe.unet(z, torch.randint(0, 1000, (batch,)), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    with FlopCounterMode(display=False) as counter:
        forward(1)
    mflop = counter.get_total_flops() / 1e6
    figures = {"family": cfg.family, "settings": args.assignments, "threads": args.threads, "batch": cfg.batch,
               "forward_mflop_per_sample": round(mflop, 1),
               "parameters_m": round(sum(p.numel() for p in params) / 1e6, 3)}
    if args.steps:
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        times = []
        for i in range(args.steps + 2):
            start = time.perf_counter()
            loss = forward(cfg.batch).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        figures["seconds_per_step"] = round(statistics.median(times), 3)
    figures["recipe"] = dataclasses.asdict(cfg)
    print(json.dumps({k: v for k, v in figures.items() if k != "recipe"}))
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    run(main)
