"""Automatic neighbour preservation for stage A (ours; in the spirit of SPEED's influence-based prior filtering,
arXiv 2503.07392, and Bui et al.'s adaptive anchors, arXiv 2410.15618).

A first solve tells which other words the edit moves: for each candidate word w, the share of its projected
features that the edit changes,

    moved(w) = Σ_l ||W_l (S − I) F_wᵀ||² / Σ_l ||W_l F_wᵀ||² = tr((S−I)ᵀ K (S−I) G_w) / tr(K G_w),

with F_w the rows stage A would preserve for "a photo of a w" (the config's token selection), G_w = F_wᵀF_w and
K = Σ_l W_lᵀW_l over the stream's projections, summed over the streams. Words the edit moves at least
``neighbour_synonym`` × as much as the concept itself are the concept under another name (left to the erasure);
of the rest, the ``neighbours`` most moved are added to the preserved prompts and the system is solved again.
The candidates come from the model, never from an evaluation's class list: the whole-word tokens of its CLIP
tokenizer (or a word file), the ``neighbour_pool`` nearest the concept's tokens in the input embedding table first.
Word-final sub-word pieces of the vocabulary ("ity") pass as words; a curated list avoids them. ``engine`` below is
the closed-form engine (its encoder, token positions, weights and solve), passed in rather than imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import Concept
from ..errors import TraceEraseError
from ..models.base import SegmentedLayout, TokenLayout
from .gram import GramStats
from .prompts import fill
from .rece import projection_gram

PROBE_TEMPLATE = "a photo of a {}"
# function words and the probe template's own words: never a concept's neighbour
STOPWORDS = frozenset(
    "a an the of in on at by with and or to from for into onto over under this that these those is are was were be "
    "been it its as not no but so than then there here very some any all each every one photo image picture".split()
)


def vocabulary_words(adapter: Any, source: str) -> list[str]:
    """Candidate words: ``"model"`` — the whole-word tokens of the pipeline's CLIP tokenizer (``…</w>``), letters
    only, three or more — or a text file of words (one or more per line)."""
    if source != "model":
        path = Path(source)
        if not path.is_file():
            raise TraceEraseError(f"neighbour_vocab '{source}' does not exist; give a text file of words, or 'model'")
        words = re.findall(r"[a-z]+", path.read_text().lower())
    else:
        tok = getattr(adapter.pipe, "tokenizer", None)
        vocab = tok.get_vocab() if tok is not None else {}
        words = [w[:-4] for w in vocab if w.endswith("</w>")]
        if not words:
            raise TraceEraseError("this pipeline has no CLIP tokenizer to draw neighbours from; give "
                                  "neighbour_vocab=FILE (a text file of words)")
    return sorted({w for w in words if w.isalpha() and len(w) >= 3 and w not in STOPWORDS})


def _excluded(concepts: list[Concept]) -> set[str]:
    """The concepts' and anchors' own words, and their preserved prompts' (already kept)."""
    texts = [t for c in concepts for t in (c.name, c.anchor, *c.preserve)]
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


def nearest_by_embedding(adapter: Any, words: list[str], concepts: list[Concept], pool: int) -> list[str]:
    """The ``pool`` words whose input-embedding rows are nearest (cosine) any concept's tokens: a cheap pre-filter
    before each candidate is encoded."""
    if len(words) <= pool:
        return words
    tok = adapter.pipe.tokenizer
    table = adapter.pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    concept_rows = torch.nn.functional.normalize(table[[i for c in concepts for i in ids(c.name)]], dim=-1)
    first = [ids(w)[0] for w in words]
    word_rows = torch.nn.functional.normalize(table[first], dim=-1)
    score = (word_rows @ concept_rows.T).max(dim=1).values
    keep = torch.topk(score, pool).indices.tolist()
    return [words[i] for i in sorted(keep)]


def measure(engine: Any, texts: list[str], solutions: dict[str, torch.Tensor], n_concepts: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text placed in :data:`PROBE_TEMPLATE`: moved(w) under the per-stream solves S, and its similarity
    to each of the first ``n_concepts`` texts (the concepts) before the edit — the cosine, in the projections' metric
    K and averaged over the streams, of its mean feature row at the word's tokens, centred on the mean over the
    candidates (the shared component of every prompt would otherwise make all words look alike)."""
    prompts = [fill(PROBE_TEMPLATE, t) for t in texts]
    feats = engine.encode([p for p, _ in prompts], "measuring neighbours")
    num, den = torch.zeros(len(texts), dtype=torch.float64), torch.zeros(len(texts), dtype=torch.float64)
    sims = torch.zeros(len(texts), n_concepts, dtype=torch.float64)
    for stream in engine.streams:
        k = projection_gram(engine._weight(stream, name)[1] for name in stream.modules)
        r = solutions[stream.name] - torch.eye(k.shape[0], dtype=torch.float64)
        moved_k = r.T @ k @ r
        means = []
        for i, (prompt, span) in enumerate(prompts):
            f = feats[prompt][stream.name].double()
            word = f
            if stream.per_token:
                layout = engine.adapter.token_layout(prompt, span)
                pos, _, _ = engine.positions(layout, layout, stream)
                f, word = f[..., pos, :], f[..., word_positions(layout), :]
            f = f.reshape(-1, f.shape[-1])
            g = f.T @ f
            num[i] += float((moved_k * g).sum())
            den[i] += float((k * g).sum())
            means.append(word.reshape(-1, word.shape[-1]).mean(0))
        m = torch.stack(means)
        m = m - m[n_concepts:].mean(0) if len(texts) > n_concepts else m
        gram = m @ k @ m.T
        norm = gram.diag().clamp(min=1e-30).sqrt()
        sims += (gram / (norm[:, None] * norm[None, :]))[:, :n_concepts]
    return num / den.clamp(min=1e-30), sims / len(engine.streams)


def word_positions(layout: TokenLayout | SegmentedLayout) -> list[int]:
    """The positions of the word's tokens in the feature sequence; in a joint sequence (SD3's CLIP then T5
    positions), in every segment, offset into it."""
    if isinstance(layout, SegmentedLayout):
        return [offset + p for offset, part, _ in layout.parts for p in range(part.start, part.end)]
    return list(range(layout.start, layout.end))


def select_neighbours(engine: Any, concepts: list[Concept], stats: dict[str, GramStats]
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """The neighbours to preserve, each with how much the first solve moved it, and the concepts' own shares (the
    yardstick of the synonym rule). A candidate is taken for the concept under another name, and left to the
    erasure, when the edit moves it at least ``neighbour_synonym`` × as much as the concept or its centred
    similarity to a concept is at least ``neighbour_similarity``."""
    cfg = engine.config
    solutions = {stream.name: engine.solve(stream, stats[stream.name])[0] for stream in engine.streams}
    excluded = _excluded(concepts)
    words = [w for w in vocabulary_words(engine.adapter, cfg.neighbour_vocab) if w not in excluded]
    if cfg.neighbour_vocab == "model":
        words = nearest_by_embedding(engine.adapter, words, concepts, cfg.neighbour_pool)
    n = len(concepts)
    shares, sims = measure(engine, [c.name for c in concepts] + words, solutions, n)
    own = {c.name: float(s) for c, s in zip(concepts, shares[:n], strict=True)}
    limit = cfg.neighbour_synonym * min(own.values())
    ranked = sorted(((float(s), w) for s, w, sim in zip(shares[n:], words, sims[n:], strict=True)
                     if s < limit and float(sim.max()) < cfg.neighbour_similarity), reverse=True)
    return {w: s for s, w in ranked[: cfg.neighbours]}, own
