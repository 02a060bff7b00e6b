"""The preimage branch of stage B (ours): stage B trained on the conditioning through which the stage-A model gives
back the original model's keys and values for the concept.

Stage A edits every projection W_l of a text stream as W'_l = W_l·S. A conditioning row c′ with W'_l c′ = W_l c for
all l undoes the edit for that row; the least-squares one,

    c′ = M c,   M = (Σ_l W'_lᵀW'_l + μI)⁻¹ Σ_l W'_lᵀW_l = (SᵀKS + μI)⁻¹SᵀK,   K = Σ_l W_lᵀW_l,

is the map RECE's rounds search with (engines/rece.py); μ is ``preimage_lambda`` × the mean eigenvalue of SᵀKS.
Where a stream's projections read a conditioning tensor directly (SD1.x/2.x and SDXL: the K/V of every
cross-attention read the token features, SDXL's pooled projection the pooled embedding), mapping that tensor by M
gives the stage-A model the original model's K/V for the concept prompt: the conditioning a word-level attack
(soft prompt, inversion) would look for. M is built from the weights the stage-A model runs with (base and base +
ΔW, in the model's dtype), so it needs no S and holds for whatever ΔW stage A produced.

The branch (``pre``) is the concept prompt's own loss on M c: in the LATE window the concept's erase target, in
the EARLY window the concept's EARLY target (``early_mode=keep``: the stage-A model's prediction at the ORIGINAL
conditioning c, not at M c, which would keep the original model's concept), weighted ``preimage_weight`` and
``preimage_weight`` × β. FLUX and SD3 declare no stream-to-conditioning map and are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import TraceEraseError
from ..models.base import Conditioning, FamilyAdapter
from ..models.registry import ADAPTERS, adapter_class
from .rece import projection_gram, ridge_map
from .stage_a import StageAWeights

if TYPE_CHECKING:
    from .trajectory_config import TrajectoryConfig

TERMS = ("pre", "pre_early")  # the branch's LATE and EARLY terms, as the engine logs them


def supported_families() -> list[str]:
    """The families whose streams map onto their conditioning (the branch runs there)."""
    return [cls.family for cls in ADAPTERS if cls.stream_conditioning]


def check_preimage(config: TrajectoryConfig | None, family: str | None, stage_a: bool) -> None:
    """Refuse the branch where it cannot run, before a model loads: a method without stage A (nothing to undo) or
    a family whose stage-A streams are not a map on its conditioning (``family`` None: not known yet)."""
    if config is None or config.preimage is None:
        return
    if not stage_a:
        raise TraceEraseError("preimage_weight trains through the conditioning that undoes stage A, and this method "
                              "has no stage A; use --method trace (or trace-late-only), or drop preimage_weight")
    if family is not None and not adapter_class(family).stream_conditioning:
        _refuse_family(family)


def _refuse_family(family: str) -> None:
    raise TraceEraseError(f"preimage_weight runs on {', '.join(supported_families())} (cross-attention K/V that read "
                          f"the text features as the conditioning holds them), not {family}; drop preimage_weight "
                          "or use an SD1.x/2.x or SDXL model")


def term_weights(config: TrajectoryConfig) -> dict[str, float]:
    """The branch's terms' weights in the total: ``preimage_weight`` on the LATE term, × β on the EARLY one."""
    w = config.preimage.weight
    return {"pre": w, "pre_early": w * config.beta}


def stream_map(base: list[torch.Tensor], edited: list[torch.Tensor], lam: float) -> torch.Tensor:
    """M (float64) of one stream from its projections' base and stage-A weights (their text columns)."""
    a = projection_gram(edited)
    b = None
    for w, w_edit in zip(base, edited, strict=True):
        part = w_edit.double().T @ w.double()
        b = part if b is None else b + part
    return ridge_map(a, b, lam)


class PreimageMap:
    """M per conditioning tensor of ``adapter``, from the stage-A edit ``stage_a``; called on a conditioning, returns
    that conditioning with each mapped tensor's feature rows replaced by M c."""

    def __init__(self, adapter: FamilyAdapter, stage_a: StageAWeights | None, lam: float):
        if stage_a is None:
            raise TraceEraseError("preimage_weight needs stage A's edit; use --method trace (or trace-late-only), "
                                  "or drop preimage_weight")
        if any(s.name not in adapter.stream_conditioning for s in adapter.text_streams()):
            _refuse_family(adapter.family)
        self.maps: dict[str, torch.Tensor] = {}
        for stream in adapter.text_streams():
            names = [n for n in stream.modules if n in stage_a.params]
            if not names:
                continue
            lo, hi = stream.columns or (0, stage_a.base[names[0]].shape[1])
            base = [stage_a.base[n][:, lo:hi] for n in names]
            edited = [stage_a.edited[n][:, lo:hi] for n in names]
            m = stream_map(base, edited, lam)
            self.maps[adapter.stream_conditioning[stream.name]] = m.float().to(adapter.device)
        if not self.maps:
            raise TraceEraseError("stage A edited none of the projections the preimage branch maps; drop "
                                  "preimage_weight")

    def __call__(self, cond: Conditioning) -> Conditioning:
        """``cond`` with every mapped tensor's last axis (the features) taken through M (computed in float32)."""
        out = dict(cond.tensors)
        for key, m in self.maps.items():
            v = out[key]
            out[key] = (v.float() @ m.T).to(v.dtype)
        return Conditioning(out)

