"""Identity of the base weights an erasure was made for, robust to loading the same model in another precision."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import TraceEraseError

SAMPLES = 8


def fingerprint(adapter: Any, modules: list[str]) -> dict[str, Any]:
    """sha256 of the edited weights (float32 bytes) plus, per module, its norm and a few fixed entries."""
    digest = hashlib.sha256()
    probe: dict[str, list[float]] = {}
    for name in sorted(modules):
        w = adapter.module(name).weight.detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(w.numpy().tobytes())
        flat = w.flatten()
        idx = torch.linspace(0, flat.numel() - 1, SAMPLES).long()
        probe[name] = [float(w.norm())] + [float(v) for v in flat[idx]]
    return {"sha256": digest.hexdigest(), "modules": probe}


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], made_for: str) -> None:
    """Raise unless ``actual`` is the same base model (exact hash, or equal up to half-precision rounding)."""
    if expected.get("sha256") == actual.get("sha256"):
        return
    exp_mods, act_mods = expected.get("modules", {}), actual.get("modules", {})
    if set(exp_mods) != set(act_mods):
        raise TraceEraseError(
            f"this erasure edits layers the model does not have (made for '{made_for}'); load it on that base model"
        )
    for name, exp in exp_mods.items():
        got = act_mods[name]
        scale = max(abs(exp[0]), 1e-12)
        if abs(got[0] - exp[0]) > 1e-2 * scale or any(
            abs(g - e) > 1e-2 * max(abs(e), 1e-3) + 1e-3 for g, e in zip(got[1:], exp[1:], strict=True)
        ):
            raise TraceEraseError(
                f"this erasure was made for a different base model ('{made_for}', weights sha256 "
                f"{expected.get('sha256', '?')[:12]}); apply it to that model"
            )
