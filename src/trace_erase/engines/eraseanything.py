"""EraseAnything's terms (Gao et al., ICML 2025) for the trajectory engine: an attention regulariser on the concept's
tokens, and the bi-level "lower" step — flow matching on images of the concept drawn by the base model plus a
reverse self-contrastive (InfoNCE) term on attention maps. The "upper" step is the engine's ESD erase loss with the
regulariser added. Steps alternate (even: upper, odd: lower), as in its training script.

Reconstruction choices that are ours (its code returns maps from a forked diffusers and draws irrelevant concepts
from GPT-4o and synonyms from WordNet, none of which we use):

- map = attention mass each image position's queries put on the concept's T5 positions (softmax over every key,
  mean over heads), one per double-stream block; the regulariser is the L2 norm of each block's map over image
  positions, summed over blocks, averaged over the batch;
- the contrastive "negative" is the stage-A model's own map under the concept prompt on the same state (no WordNet:
  the self in self-contrastive); the irrelevant concepts are the concept's ``preserve`` prompts, or, when none are
  given, captions of our built-in corpus; their maps (stage-A model, same state, the concept's positions) are the
  positives;
- the images of the lower step are the final latents of the replay pool's trajectories (the base model's samples
  under the training prompts), noised at a uniform random time.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import Concept
from ..errors import TraceEraseError
from ..models.base import Conditioning
from .pool import Pool

if TYPE_CHECKING:
    from ..models.base import FamilyAdapter
    from .protocol import StageBEngine


class ConceptMasks:
    """``[B, L]`` masks with 1 at the token positions of the concept each prompt names (the longest name it contains),
    computed once per prompt."""

    def __init__(self, adapter: FamilyAdapter, concepts: list[Concept]):
        self.adapter, self.concepts = adapter, concepts
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            if prompt not in self.cache:
                self.cache[prompt] = self._row(prompt)
            rows.append(self.cache[prompt])
        return torch.stack(rows)

    def _row(self, prompt: str) -> torch.Tensor:
        names = sorted((c.name for c in self.concepts if c.name.lower() in prompt.lower()), key=len, reverse=True)
        if not names:
            raise TraceEraseError(f"the training prompt '{prompt}' names no concept; attention terms need one")
        start = prompt.lower().index(names[0].lower())
        layout = self.adapter.token_layout(prompt, (start, start + len(names[0])))
        if not hasattr(layout, "start"):
            raise TraceEraseError("attention terms need a single-encoder token layout (FLUX's T5 sequence)")
        row = torch.zeros(layout.max_length)
        row[layout.start:layout.end] = 1.0
        return row


def attention_penalty(maps: list[torch.Tensor]) -> torch.Tensor:
    """Σ over blocks of the L2 norm (over image positions) of the concept's attention mass, mean over the batch."""
    return sum(m.norm(dim=-1) for m in maps).mean()


def block_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """One vector per sample: the blocks' maps side by side (``[B, blocks × N_img]``)."""
    return torch.cat(maps, dim=-1)


def contrast_loss(center: torch.Tensor, negative: torch.Tensor, irrelevant: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Reverse self-contrastive InfoNCE: the log-probability that ``negative`` (``[B, D]``, the concept's reference
    map) picks ``center`` (the trained model's map) among ``center`` and the ``irrelevant`` maps (``[B, K, D]``),
    by cosine similarity / ``temperature``. Minimising it moves the trained map away from the concept's and
    towards the irrelevant concepts' maps."""
    candidates = F.normalize(torch.cat([center[:, None], irrelevant], dim=1), dim=-1)
    logits = torch.einsum("bd,bkd->bk", F.normalize(negative, dim=-1), candidates) / temperature
    return (logits[:, 0] - logits.logsumexp(dim=1)).mean()


def lower_terms(engine: StageBEngine, masks: ConceptMasks, pool: Pool, irrelevant: list[str],
                backward_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The lower step's terms (``flow``, ``contrast``) on a batch of the pool's final images; with
    ``backward_scale`` the gradients of ``backward_scale · (λ_flow·flow + λ_contrast·contrast)`` are accumulated
    and the terms come back detached."""
    cfg, adapter, gen = engine.config, engine.adapter, engine.gen
    ea = cfg.eraseanything
    if not pool.finals:
        raise TraceEraseError("the replay pool holds no final images (an older checkpoint); rerun with --overwrite")
    rows = [int(torch.randint(0, len(pool.finals), (1,), generator=gen)) for _ in range(cfg.batch_size)]
    x0 = torch.stack([pool.finals[j] for j in rows]).to(adapter.device, adapter.dtype)
    prompts = [pool.prompts[j] for j in rows]
    noise = torch.randn(x0.shape, generator=gen).to(adapter.device, adapter.dtype)
    u = torch.rand(len(rows), generator=gen)
    x_t, t, target = adapter.training_pair(x0, noise, u)
    cond = engine.cond(prompts)
    use_contrast = ea.contrast_weight > 0
    mask = masks(prompts) if use_contrast else None
    with adapter.token_attention(mask) if use_contrast else contextlib.nullcontext([]) as maps:
        pred = adapter.predict(x_t, t, cond)
    flow = (pred.float() - target.float()).pow(2).flatten(1).mean(1).mean()
    contrast = torch.zeros((), device=x_t.device)
    if use_contrast:
        center = block_features(maps)
        picks = [irrelevant[int(torch.randint(0, len(irrelevant), (1,), generator=gen))]
                 for _ in range(ea.contrast_irrelevant)]
        conds = [cond] + [engine.cond([p] * len(rows)) for p in picks]
        k = len(conds)
        with torch.no_grad(), engine.stage_a_model(), adapter.token_attention(mask.repeat(k, 1)) as ref_maps:
            adapter.predict(x_t.repeat(k, 1, 1, 1), t.repeat(k), Conditioning.cat(conds))
        ref = block_features(ref_maps).unflatten(0, (k, len(rows)))  # [k, B, D]
        contrast = contrast_loss(center, ref[0], ref[1:].transpose(0, 1), ea.contrast_temperature)
    terms = {"flow": flow, "contrast": contrast}
    if backward_scale is not None:
        engine.backward(backward_scale * (ea.flow_weight * flow + ea.contrast_weight * contrast))
        terms = {key: v.detach() for key, v in terms.items()}
    return terms
