"""Token-level searches whose result is a prompt a user could type: Ring-A-Bell's genetic search and P4D's projected
soft tokens. Objectives, budgets and conventions: the attacks page of the docs (``docs/attacks.md``).

- ``ring-a-bell``: model-agnostic (it only reads the text encoders). For each scored template, the target is
  E(template with the neutral word) + η·v, v the concept vector of ``concept-vector``; a population of K-token
  prompts of whole words evolves (keep the better half, single-point crossover, single-position mutation) towards
  the target's text features, all positions and streams.
- ``p4d``: P4D-N. n free word embeddings, projected to the nearest whole-word token embedding (cosine) in the
  forward pass and updated in the free space (PEZ's straight-through), with AdamW at P4D's lr 0.1 / weight decay 0.1;
  the objective is AdvUnlearn's / P4D's ‖ŷ_model(x_t, t, c_adv) − ŷ_base(x_t, t, c)‖², one prompt per scored template
  on that template's states; the prompt is the n decoded tokens alone.

Our choices (not the papers'): Ring-A-Bell's fitness is a mean over each stream's elements (streams of different
widths weigh alike), and the run is shorter than the original 3,000 generations; P4D's states are the base model's
own trajectories (``Reference``) rather than one noised target image, and its scored prompt is the last projection,
not the one with the best CLIP image similarity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..errors import TraceEraseError
from ..evaluation.suites import fill
from ..models import ModelHandle
from ..models.base import Conditioning
from ..models.injection import WordSlots, decode_tokens, no_param_grads, typable_ids
from .config import AttackConfig
from .optimisers import (
    VECTOR_TEMPLATES,
    Candidate,
    Report,
    attacked_modules,
    concept_direction,
    descend,
    match_base_loss,
)
from .prompts import EVAL_TEMPLATES
from .reference import Reference

FITNESS_CHUNK = 50  # prompts encoded at once by the genetic search


def _vocabulary(handle: ModelHandle) -> tuple[object, torch.Tensor]:
    """The per-token tokenizer and its whole-word ids (what a user can type one token at a time)."""
    tok = handle.adapter.token_tokenizer
    ids = torch.tensor(typable_ids(tok))
    if len(ids) == 0:
        raise TraceEraseError("the tokenizer has no whole-word tokens to build a token-level attack from")
    return tok, ids


# ---- Ring-A-Bell -----------------------------------------------------------------------------------------------------
def genetic_search(fitness: Callable[[torch.Tensor], torch.Tensor], vocab: int, length: int, population: int,
                   generations: int, gen: torch.Generator,
                   on_generation: Callable[[int, torch.Tensor, float], None] | None = None
                   ) -> tuple[torch.Tensor, float]:
    """Ring-A-Bell's search over sequences of ``length`` indices in ``[0, vocab)``: each generation keeps the better
    half (lower ``fitness``, which maps ``[P, length]`` indices to ``[P]``), and refills the rest with children of two
    random survivors (single-point crossover with probability 0.5, else a copy of the first; then one random position
    mutated with probability 0.25). Returns the best sequence and its fitness; ``on_generation(g, best, fit)``."""
    if population < 2 or length < 1 or vocab < 1:
        raise TraceEraseError("the genetic search needs a population of at least 2 and sequences of at least 1 token")
    pop = torch.randint(0, vocab, (population, length), generator=gen)
    keep = population - population // 2
    fit = fitness(pop)
    for g in range(1, generations + 1):
        order = torch.argsort(fit, stable=True)
        elite, elite_fit = pop[order[:keep]], fit[order[:keep]]
        n = population - keep
        a = elite[torch.randint(0, keep, (n,), generator=gen)]
        b = elite[torch.randint(0, keep, (n,), generator=gen)]
        cut = torch.randint(1, max(length, 2), (n, 1), generator=gen)
        cross = torch.rand(n, 1, generator=gen) < 0.5
        take_b = cross & (torch.arange(length).unsqueeze(0) >= cut)
        children = torch.where(take_b, b, a)
        mutate = torch.rand(n, generator=gen) < 0.25
        where = torch.randint(0, length, (n,), generator=gen)
        values = torch.randint(0, vocab, (n,), generator=gen)
        children[mutate, where[mutate]] = values[mutate]
        pop = torch.cat([elite, children])
        fit = torch.cat([elite_fit, fitness(children)])
        if on_generation is not None:
            best = int(torch.argmin(fit))
            on_generation(g, pop[best], float(fit[best]))
    best = int(torch.argmin(fit))
    return pop[best], float(fit[best])


def _feature_distance(cond: Conditioning, target: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """Per-row distance of ``cond``'s text features to ``target`` (one row): each stream's mean squared difference,
    summed over the streams."""
    out = torch.zeros(len(cond.tensors[keys[0]]))
    for k in keys:
        diff = cond.tensors[k].float() - target[k].float()
        out += diff.pow(2).flatten(1).mean(1).cpu()
    return out


def ring_a_bell_search(handle: ModelHandle, cfg: AttackConfig, concept: str, progress: bool = True
                       ) -> dict[int, list[tuple[list[int], float]]]:
    """One genetic search per scored template towards E(template with the neutral word) + η·v, through the text
    encoders as they are (call it before an erasure is applied: Ring-A-Bell builds its prompts with the original
    model's text encoder and hands them to the erased model). Returns, per budget point, each template's best token
    ids and fitness."""

    adapter = handle.adapter
    tok, ids = _vocabulary(handle)
    v, keys, _ = concept_direction(handle, concept, cfg.neutral, VECTOR_TEMPLATES)
    eta = cfg.the_etas[0]
    neutral = [fill(t, cfg.neutral) for t in EVAL_TEMPLATES]
    with torch.no_grad():
        base = adapter.conditioning(neutral)
    points = set(cfg.budget_points())
    found: dict[int, list[tuple[list[int], float]]] = {p: [] for p in points}
    bar = tqdm(total=cfg.the_budget * len(neutral), desc="ring-a-bell", disable=not progress, leave=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in range(len(neutral)):
        target = {k: base.tensors[k][i:i + 1].float() + eta * v[k] for k in keys}

        def fitness(pop: torch.Tensor, target: dict[str, torch.Tensor] = target) -> torch.Tensor:
            texts = [decode_tokens(tok, ids[row].tolist()) for row in pop]
            with torch.no_grad():  # in chunks: 200 prompts through T5-XXL at once would hold GBs of activations
                return torch.cat([_feature_distance(adapter.conditioning(texts[j:j + FITNESS_CHUNK]), target, keys)
                                  for j in range(0, len(texts), FITNESS_CHUNK)])

        def seen(g: int, best: torch.Tensor, fit: float) -> None:
            bar.update(1)
            if g in points:
                found[g].append((ids[best].tolist(), fit))

        genetic_search(fitness, len(ids), cfg.the_tokens, cfg.population, cfg.the_budget, gen, seen)
    bar.close()
    return found


def _report_found(handle: ModelHandle, found: dict[int, list[tuple[list[int], float]]], report: Report,
                  score: str, detail: dict) -> None:
    """At each budget point, the searched prompts (one per scored template; decoded text) with their token ids and
    scores (``score``: what the number is) besides ``detail``."""
    tok = handle.adapter.token_tokenizer
    for budget in sorted(found):
        texts = [decode_tokens(tok, best) for best, _ in found[budget]]
        report(budget, Candidate(texts, texts, detail={**detail, score: [f for _, f in found[budget]],
                                                       "tokens": [b for b, _ in found[budget]]}))


def ring_a_bell(handle: ModelHandle, cfg: AttackConfig, found: dict[int, list[tuple[list[int], float]]],
                report: Report) -> None:
    """Report the searched prompts at each budget point."""
    _report_found(handle, found, report, "fitness",
                  {"eta": cfg.the_etas[0], "targets": [fill(t, cfg.neutral) for t in EVAL_TEMPLATES]})


# ---- P4D -------------------------------------------------------------------------------------------------------------
def nearest_tokens(free: torch.Tensor, table: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the rows of ``table`` nearest to each row of ``free`` by cosine similarity (PEZ's projection);
    ``unit``: the table's rows normalised, when the caller keeps them across steps."""
    unit = torch.nn.functional.normalize(table.float(), dim=-1) if unit is None else unit
    return (torch.nn.functional.normalize(free.float(), dim=-1) @ unit.T).argmax(-1)


def projected(free: torch.Tensor, table: torch.Tensor, unit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEZ's straight-through projection: the forward value is the nearest token embeddings, the gradient goes to
    ``free``. Returns (embeddings, token indices)."""
    idx = nearest_tokens(free.detach(), table, unit)
    hard = table[idx].to(free.dtype)
    return free + (hard - free).detach(), idx


def p4d(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Reference, report: Report,
        progress: bool = True) -> None:
    """P4D-N: for each scored template, n projected soft tokens alone as the prompt, matching the base model's
    prediction for that template on its own states; other text encoders (FLUX's CLIP) see the filler while
    optimising, the decoded text when scored."""
    adapter = handle.adapter
    slots = WordSlots(adapter, cfg.the_tokens, list(ref.prompts))
    tok, ids = _vocabulary(handle)
    main = next((i for i, (t, _) in enumerate(slots.encoders) if t is tok), 0)
    table = slots.tables()[main]
    sub = table[ids.to(table.device)].float()
    unit = torch.nn.functional.normalize(sub, dim=-1)  # once, not at every step
    alone = slots.placed("{}")
    points = set(cfg.budget_points())
    found: dict[int, list[tuple[list[int], float]]] = {p: [] for p in points}
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.the_budget * len(ref.prompts), desc="p4d", disable=not progress, leave=False)
    with no_param_grads(attacked_modules(handle)):
        for i in range(len(ref.prompts)):
            mine = torch.nonzero(ref.state_prompt == i).flatten()
            start = torch.randint(0, len(ids), (cfg.the_tokens,), generator=gen)
            free = sub[start].clone().requires_grad_(True)
            opt = torch.optim.AdamW(slots.param_groups([free], cfg.the_lr, 0.1, [main]))
            for step in range(1, cfg.the_budget + 1):
                embeds, _ = projected(free, sub, unit)
                values: list[torch.Tensor | None] = [None] * len(slots.encoders)
                values[main] = embeds
                pick = mine[torch.randint(0, len(mine), (cfg.batch,), generator=gen)]
                with slots.active(values), adapter.text_gradients():
                    cond = adapter.conditioning([alone] * len(pick))
                loss = match_base_loss(handle, ref, pick, cond)
                descend(opt, loss, step, "p4d")
                bar.update(1)
                if step in points:
                    idx = nearest_tokens(free.detach(), sub, unit).cpu()  # ids live on the CPU
                    found[step].append((ids[idx].tolist(), float(loss.detach())))
    bar.close()
    _report_found(handle, found, report, "loss", {"targets": list(ref.prompts)})
