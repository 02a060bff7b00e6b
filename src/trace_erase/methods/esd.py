"""ESD (Gandikota et al. 2023) as trajectory-engine configurations.

Erase everywhere (all timesteps) towards ε*(∅) − η(ε*(c) − ε*(∅)), no keep terms. The layer sets are ESD's own:
ESD-x trains all of cross-attention (q, k, v, out); ESD-u everything but cross-attention, the time embedding and
the output layer ("noxattn": resnet convolutions, self-attention, feed-forward, projections, samplers, conv_in).
Here as LoRA (rank 4) rather than full fine-tuning: ours, for one artifact format and memory parity with TRACE.
"""

from .base import MethodSpec

_ESD = {"window": "all", "early_mode": "none", "eta": 1.0, "beta": 0.0, "gamma": 0.0, "rank": 4, "lr": 1e-4,
        "steps": 1000, "rollout_guidance": 3.0}

ESD_X = MethodSpec(
    name="esd-x",
    engine="trajectory",
    summary="ESD-x: reversed guidance at all timesteps, LoRA on cross-attention",
    trajectory={**_ESD, "lora_targets": "cross-attn"},
)

ESD_U = MethodSpec(
    name="esd-u",
    engine="trajectory",
    summary="ESD-u: reversed guidance at all timesteps, LoRA on every layer but cross-attention/time embed/output",
    trajectory={**_ESD, "lora_targets": "non-cross"},
)
