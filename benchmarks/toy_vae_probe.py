"""Train only the VAE phase of a toy recipe and report how well its reconstructions keep class, style and colour.

A cheaper latent (e.g. a VAE that downsamples 4× instead of 2×) makes every denoiser step cheaper, but samples can
be no better than the VAE's reconstructions; this probe answers that in one VAE phase (~11 min at 2 threads) instead
of a full toy training. The VAE is trained by the real trainer into ``OUTPUT.partial``, so
``trace-erase toyworld train --family sd --set ... --output OUTPUT`` later resumes from it with the same settings.

    python benchmarks/toy_vae_probe.py --set vae_channels=24,48,64 --set latent_channels=16 \\
        --output out/f4/toy-sd-16 [--threads 2] [--json benchmarks/results/toy_vae_probe_f4-16.json]
"""

from __future__ import annotations

import argparse
import json
import time

from _script import run, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="assignments", action="append", default=[], help="recipe setting KEY=VALUE")
    parser.add_argument("--output", required=True, help="the pipeline folder a full run would write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro", action="store_true", help="micro sizes (tests)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import torch

    from trace_erase.toyworld.check import vae_reconstruction
    from trace_erase.toyworld.components import build_components
    from trace_erase.toyworld.config import override, preset
    from trace_erase.toyworld.train import ToyTrainer

    torch.set_num_threads(args.threads)
    cfg = override(preset("sd", micro=args.micro), args.assignments)
    start = time.perf_counter()
    trainer = ToyTrainer(cfg, args.output, progress=not args.micro)
    state = torch.load(trainer.ckpt_path, weights_only=True) if trainer.ckpt_path.exists() else None
    if state is None or state["phase"] == "vae":
        trainer.run(stop_after=cfg.vae_steps - (state["step"] if state else 0))
        state = torch.load(trainer.ckpt_path, weights_only=True)
    minutes = (time.perf_counter() - start) / 60
    vae = build_components(cfg)["vae"]
    vae.load_state_dict(state["vae"])
    vae.eval()
    result = {
        "settings": args.assignments, "threads": args.threads, "vae_steps": cfg.vae_steps,
        "minutes_this_call": round(minutes, 2), "reconstruction": vae_reconstruction(vae),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run(main)  # bad --set or output: one line and exit 2, as the CLI does
