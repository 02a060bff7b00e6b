"""GPU diagnosis behind the README's "On a GPU" notes (needs CUDA; prints, asserts nothing):

  1. a bf16 FLUX stage B (esd-x, 12 steps) under each attention-kernel choice (torch: torch's own; auto: ours, no
     cuDNN; math: the reference kernel; and fp32), naming the first modules whose output is not finite;
  2. SD stage B: CUDA/CPU × bf16/fp32 agreement of the trained LoRA (cosine, relative error);
  3. --offload text-encoders against encoders on the GPU and on the CPU, fp32 and bf16.

    python3 benchmarks/gpu_diagnose.py      (2026-11-30 on an H200, its first version: about 90 s)
"""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trace_erase import erase  # noqa: E402
from trace_erase.errors import NonFiniteLossError  # noqa: E402
from trace_erase.models import load_model  # noqa: E402
from trace_erase.models.builders import tiny_flux_pipeline, tiny_sd_pipeline  # noqa: E402

TRAIN = {"steps": 12, "lr": 3e-3, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2,
         "checkpoint_every": 1000}
CF = {"templates": ["{}", "a photo of {}"]}


def delta(er: Any) -> torch.Tensor:
    return torch.cat([d.float().cpu().flatten() for _, d in sorted(er.deltas().items())])


def agree(a: torch.Tensor, b: torch.Tensor) -> str:
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return f"cos {cos:.5f}, rel {float((a - b).norm() / b.norm()):.4f}"


def watch(module: torch.nn.Module, log: list[tuple[str, str]]) -> list[Any]:
    """Forward hooks recording (name, dtype) of the first modules that output a non-finite tensor."""
    def hook(name: str) -> Any:
        def fn(mod: Any, inp: Any, out: Any) -> None:
            outs = out if isinstance(out, tuple | list) else (out,)
            bad = [o for o in outs if torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all()]
            if bad and len(log) < 8:
                log.append((name, str(bad[0].dtype)))
        return fn
    return [m.register_forward_hook(hook(n)) for n, m in module.named_modules()]


def main() -> None:
    torch.manual_seed(0)
    tiny_flux_pipeline(0).save_pretrained("/tmp/diag-flux")
    torch.manual_seed(0)
    tiny_sd_pipeline(0).save_pretrained("/tmp/diag-sd")
    for variant in ("torch", "auto", "math", "fp32"):
        handle = load_model("/tmp/diag-flux", device="cuda", dtype="fp32" if variant == "fp32" else "bf16")
        log: list[tuple[str, str]] = []
        hooks = watch(handle.adapter.denoiser, log)
        try:
            er = erase(handle, ["cat"], method="esd-x", anchor="dog", progress=False,
                       attention_kernels="torch" if variant == "fp32" else variant, **TRAIN)
            print(f"flux {variant}: finite, final loss {er.manifest['trajectory_log']['final_losses']['total']:.5f}")
        except NonFiniteLossError as e:
            print(f"flux {variant}: {str(e)[:90]}; first non-finite outputs: {log}")
        for h in hooks:
            h.remove()
    deltas = {}
    for device, dtype in (("cuda", "bf16"), ("cuda", "fp32"), ("cpu", "fp32"), ("cpu", "bf16")):
        er = erase(load_model("/tmp/diag-sd", device=device, dtype=dtype), ["cat"], method="esd-x", anchor="dog",
                   progress=False, **TRAIN)
        deltas[device, dtype] = delta(er)
    ref = deltas["cpu", "fp32"]
    others = {f"{d} {t}": agree(v, ref) for (d, t), v in deltas.items() if (d, t) != ("cpu", "fp32")}
    print("sd esd-x vs cpu fp32:", others)
    for dtype, model, concept in (("fp32", "/tmp/diag-sd", "cat"), ("bf16", "/tmp/diag-sd", "cat"),
                                  ("bf16", "toy-sd", "circle")):
        kw = {} if model == "toy-sd" else CF
        runs = {}
        for name, place in (("off", {"device": "cuda", "offload": "text-encoders"}), ("on", {"device": "cuda"}),
                            ("cpu", {"device": "cpu"})):
            runs[name] = delta(erase(load_model(model, dtype=dtype, **place), [concept], method="trace-closed-form",
                                     progress=False, **kw))
        print(f"offload {model} {dtype}: off vs on {agree(runs['off'], runs['on'])}; off vs cpu "
              f"{agree(runs['off'], runs['cpu'])}; on vs cpu {agree(runs['on'], runs['cpu'])}")


if __name__ == "__main__":
    main()
