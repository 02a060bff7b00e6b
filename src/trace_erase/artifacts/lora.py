"""Exact low-rank export of weight deltas as diffusers/peft LoRA tensors, and back."""

from __future__ import annotations

import torch

from ..models.text_lora import split_qualified


def delta_to_lora(delta: torch.Tensor, rank_tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW ≈ B·A by SVD, keeping singular values above ``rank_tolerance`` × the largest (the numerical rank).

    Returns (A ``[r, in]``, B ``[out, r]``) in float64; the singular values are split evenly (√σ on each side).
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return delta.new_zeros(0, delta.shape[1]).double(), delta.new_zeros(delta.shape[0], 0).double()
    r = int((s > rank_tolerance * s[0]).sum())
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a LoRA pair to ``rank`` so one artifact has one rank (older diffusers mis-scale mixed ranks)."""
    r = a.shape[0]
    if r == rank:
        return a, b
    return (
        torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0),
        torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1),
    )


def pairs_to_state(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = "",
                   min_rank: int = 0) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA tensors (``{prefix}.{module}.lora_A/B.weight``; no prefix: the names are full keys) at
    one common rank (zero-padded: older diffusers mis-scale mixed ranks), float32."""
    rank = max(max((a.shape[0] for a, _ in pairs.values()), default=0), min_rank)
    state: dict[str, torch.Tensor] = {}
    for name, (a, b) in pairs.items():
        a, b = pad_rank(a, b, rank)
        key = f"{prefix}.{name}" if prefix else name
        state[f"{key}.lora_A.weight"] = a.float().contiguous()
        state[f"{key}.lora_B.weight"] = b.float().contiguous()
    return state


def deltas_to_state_dict(
    deltas: dict[str, torch.Tensor], prefix: str, rank_tolerance: float = 1e-6
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """diffusers-format LoRA tensors (``{prefix}.{module}.lora_A.weight``) for deltas, and each numerical rank."""
    pairs = {name: delta_to_lora(d, rank_tolerance) for name, d in deltas.items()}
    ranks = {name: a.shape[0] for name, (a, _) in pairs.items()}
    return pairs_to_state(pairs, prefix, min_rank=1), ranks


def lora_pairs(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per module (names relative to ``prefix``) of a diffusers-format LoRA state dict, as stored."""
    out = {}
    head = prefix + "."
    for key, a in state.items():
        if key.startswith(head) and key.endswith(".lora_A.weight"):
            name = key[len(head) : -len(".lora_A.weight")]
            out[name] = (a, state[f"{head}{name}.lora_B.weight"])
    return out


def module_pairs(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per module of a diffusers-format LoRA state dict, as stored: denoiser modules by their names relative
    to ``prefix``, text-encoder modules by their qualified names (``text_encoder.text_model.…``)."""
    out = lora_pairs(state, prefix)
    tail = ".lora_A.weight"
    for key, a in state.items():
        if key.endswith(tail) and split_qualified(key)[0] is not None:
            name = key[: -len(tail)]
            out[name] = (a, state[f"{name}.lora_B.weight"])
    return out


def lora_to_delta(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ΔW = B·A per module of a diffusers-format LoRA state dict (adapter scale 1)."""
    return {name: b.double() @ a.double() for name, (a, b) in lora_pairs(state, prefix).items()}


def _module_of(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def concat_loras(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA equal to the sum of several: per module A = [A₁; A₂], B = [B₁, B₂], then one common rank."""
    modules = list(dict.fromkeys(_module_of(k) for s in states for k in s))
    pairs = {}
    for m in modules:
        parts = [(s[f"{m}.lora_A.weight"], s[f"{m}.lora_B.weight"]) for s in states if f"{m}.lora_A.weight" in s]
        pairs[m] = (torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1))
    return pairs_to_state(pairs)
