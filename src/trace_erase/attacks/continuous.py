"""The attacks that work on text features or word vectors (the token-level searches are in :mod:`.discrete`). Each
takes the model as it is now (erased, or the base for the control run), optimises or builds its result, and hands a
:class:`~.optimisers.Candidate` to ``report(budget, candidate)`` at each budget point; the runner generates and scores
it. Objectives, budgets and conventions: the attacks page of the docs (``docs/attacks.md``).

- ``paraphrase``: prompt families (no optimisation).
- ``concept-vector``: Ring-A-Bell's continuous form: E(neutral) + η·v, v = mean[E(with c) − E(with neutral)].
- ``ring-a-bell`` and ``p4d``: token-level searches (genetic; projected soft tokens), in :mod:`.discrete`.
- ``soft-prompt``: AdvUnlearn's / P4D's objective ‖ŷ_erased(x_t, t, c_adv) − ŷ_base(x_t, t, c)‖² on states of the
  base model's trajectories; k prefix word embeddings (``word``) or the conditioning itself (``conditioning``).
- ``inversion``: CCE's textual inversion of new word vectors through the model, on the base model's final latents
  for the concept, with the model's own training loss.
- ``unlearndiff``: UnlearnDiffAtk: k discrete prefix tokens as relaxed one-hot rows (simplex-projected), sampled
  straight-through, the model's own denoising loss on the base model's latents of the concept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import TraceEraseError
from ..evaluation.suites import fill
from ..models import ModelHandle
from ..models.base import Conditioning
from ..models.injection import WordSlots, decode_tokens, editable, embeds_for, no_param_grads, typable_ids
from .config import AttackConfig
from .optimisers import (
    Candidate,
    Report,
    attacked_modules,
    budget_steps,
    check_gradients,
    check_loss,
    concept_direction,
    descend,
    match_base_loss,
)
from .prompts import EVAL_TEMPLATES, INVERSION_TEMPLATES, eval_prompts
from .reference import Reference


# ---- no optimisation -------------------------------------------------------------------------------------------------
def paraphrase(handle: ModelHandle, cfg: AttackConfig, concept: str, families: dict[str, list[str]],
               report: Report) -> None:
    """Every family's prompts, as they are."""
    prompts = [p for ps in families.values() for p in ps]
    report(len(prompts), Candidate(prompts, prompts, family=[f for f, ps in families.items() for _ in ps]))


def concept_vector(handle: ModelHandle, cfg: AttackConfig, concept: str, report: Report) -> None:
    """E(neutral prompt) + η·v for each η; v averaged over ``budget`` templates."""
    adapter = handle.adapter
    v, keys, n_templates = concept_direction(handle, concept, cfg.neutral, cfg.the_budget)
    with torch.no_grad():
        neutral = adapter.conditioning([fill(t, cfg.neutral) for t in EVAL_TEMPLATES])
        uncond = adapter.conditioning([""])
    shown = [fill(t, cfg.neutral) for t in EVAL_TEMPLATES]
    for eta in cfg.the_etas:
        table = {}
        for i, prompt in enumerate(shown):
            row = neutral.select([i])
            tensors = dict(row.tensors)
            for k in keys:
                tensors[k] = (row.tensors[k].float() + eta * v[k]).to(row.tensors[k].dtype)
            table[prompt] = Conditioning(tensors)
        report(n_templates, Candidate(shown, [f"E({p}) + {eta}·v" for p in shown],
                                         embeds=embeds_for(adapter, table, uncond),
                                         detail={"eta": eta, "v_norm": {k: float(v[k].norm()) for k in keys}}))


# ---- optimising attacks ----------------------------------------------------------------------------------------------
def soft_prompt(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Reference, report: Report,
                progress: bool = True) -> None:
    """Match the base model's predictions for the concept prompts with adversarial inputs to the model as it is."""
    if cfg.the_level == "conditioning":
        return _soft_conditioning(handle, cfg, ref, report, progress)
    adapter = handle.adapter
    prompts = eval_prompts(concept)
    slots = WordSlots(adapter, cfg.the_tokens, prompts)
    adv = [slots.prefixed(p) for p in prompts]

    def loss_at(values: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(ref.states), (cfg.batch,), generator=gen)
        with slots.active(values), adapter.text_gradients():
            cond = adapter.conditioning([adv[int(i)] for i in ref.state_prompt[idx]])
        return match_base_loss(handle, ref, idx, cond)

    _optimise_words(handle, cfg, slots, slots.init_from(slots.filler), loss_at, report, adv,
                    [f"<{cfg.the_tokens} soft tokens> {p}" for p in prompts], "soft prompt", progress)


def _soft_conditioning(handle: ModelHandle, cfg: AttackConfig, ref: Reference, report: Report,
                       progress: bool) -> None:
    """The upper bound: a free offset on each prompt's conditioning tensors (every position, every stream)."""
    adapter = handle.adapter
    with torch.no_grad():
        base = adapter.conditioning(ref.prompts)
        uncond = adapter.conditioning([""])
    keys = editable(base)
    delta = {k: torch.zeros_like(base.tensors[k], dtype=torch.float32, requires_grad=True) for k in keys}
    opt = torch.optim.Adam(list(delta.values()), lr=cfg.the_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    points = set(cfg.budget_points())

    def current() -> Conditioning:
        tensors = dict(base.tensors)
        for k in keys:
            tensors[k] = base.tensors[k] + delta[k].to(base.tensors[k].dtype)
        return Conditioning(tensors)

    with no_param_grads(attacked_modules(handle)):
        for step in budget_steps(cfg, progress, "soft conditioning"):
            idx = torch.randint(0, len(ref.states), (cfg.batch,), generator=gen)
            loss = match_base_loss(handle, ref, idx, current().select(ref.state_prompt[idx]))
            descend(opt, loss, step, "soft-prompt")
            if step in points:
                now = current()
                table = {p: Conditioning({k: v.detach() for k, v in now.select([i]).tensors.items()})
                         for i, p in enumerate(ref.prompts)}
                report(step, Candidate(list(ref.prompts), [f"<conditioning of> {p}" for p in ref.prompts],
                                       embeds=embeds_for(adapter, table, uncond),
                                       detail={"loss": float(loss.detach()),
                                               "delta_norm": {k: float(delta[k].detach().norm()) for k in keys}}))


def _denoising_loss(handle: ModelHandle, ref: Reference, cond: Conditioning, idx: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
    """The model's own training loss on the base model's final latents ``ref.x0[idx]`` under ``cond``."""
    adapter = handle.adapter
    x0 = ref.x0[idx]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    u = torch.rand(len(idx), generator=gen)
    x_t, t, target = adapter.training_pair(x0, noise, u)
    return torch.nn.functional.mse_loss(adapter.predict(x_t, t, cond).float(), target.float())


def inversion(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Reference, report: Report,
              progress: bool = True) -> None:
    """Textual inversion: ``tokens`` new word vectors (starting at ``init_word``) learned in the inversion templates
    from the base model's images of the concept, through the model as it is."""
    adapter = handle.adapter
    slots = WordSlots(adapter, cfg.the_tokens, list(INVERSION_TEMPLATES))
    placed = [slots.placed(t) for t in INVERSION_TEMPLATES]

    def loss_at(values: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(ref.x0), (cfg.batch,), generator=gen)
        which = torch.randint(0, len(placed), (cfg.batch,), generator=gen)
        with slots.active(values), adapter.text_gradients():
            cond = adapter.conditioning([placed[int(w)] for w in which])
        return _denoising_loss(handle, ref, cond, idx, gen)

    _optimise_words(handle, cfg, slots, slots.init_from(cfg.init_word), loss_at, report, placed,
                    [t.format("<c*>") for t in INVERSION_TEMPLATES], "inversion", progress)


def _optimise_words(handle: ModelHandle, cfg: AttackConfig, slots: WordSlots, init: list[torch.Tensor],
                    loss_at: Callable[[list[torch.Tensor], torch.Generator], torch.Tensor], report: Report,
                    prompts: list[str], shown: list[str], what: str, progress: bool) -> None:
    """Adam on word-slot values from ``init``; at each budget point the current values are reported as a candidate
    that generates ``prompts`` (shown as ``shown``)."""
    values = [v.to(handle.adapter.device).requires_grad_(True) for v in init]
    opt = torch.optim.Adam(slots.param_groups(values, cfg.the_lr))
    gen = torch.Generator().manual_seed(cfg.seed)
    points = set(cfg.budget_points())
    with no_param_grads(attacked_modules(handle)):
        for step in budget_steps(cfg, progress, what):
            loss = loss_at(values, gen)
            descend(opt, loss, step, what)
            if step in points:
                report(step, Candidate(prompts, shown, slots=slots, values=[v.detach().clone() for v in values],
                                       detail={"loss": float(loss.detach())}))


def simplex_projection(z: torch.Tensor) -> torch.Tensor:
    """Each row of ``z`` projected onto the probability simplex (Euclidean; sort-based)."""
    u, _ = torch.sort(z, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    rho = ((u - css / k) > 0).to(z.dtype).cumsum(-1).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(z.dtype)
    return (z - theta).clamp_min(0)


def unlearndiff(handle: ModelHandle, cfg: AttackConfig, concept: str, ref: Reference, report: Report,
                progress: bool = True) -> None:
    """k discrete prefix tokens of the per-token tokenizer's typable vocabulary (whole words), optimised as
    relaxed one-hot rows; scored as the decoded text in front of each prompt (a prompt a user could type). Other
    text encoders (FLUX's CLIP) see the filler word while optimising: only the per-token encoder is differentiated."""
    adapter = handle.adapter
    prompts = eval_prompts(concept)
    slots = WordSlots(adapter, cfg.the_tokens, prompts)
    main = next((i for i, (tok, _) in enumerate(slots.encoders) if tok is adapter.token_tokenizer), 0)
    tok = slots.encoders[main][0]
    table = slots.tables()[main]
    allowed = torch.tensor(typable_ids(tok), device=table.device)
    if len(allowed) == 0:
        raise TraceEraseError("the tokenizer has no whole-word tokens to build a token-level attack from")
    sub = table[allowed].float()
    z = torch.full((cfg.the_tokens, len(allowed)), 1.0 / len(allowed), device=table.device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=cfg.the_lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    points = set(cfg.budget_points())
    adv = [slots.prefixed(p) for p in prompts]
    with no_param_grads(attacked_modules(handle)):
        for step in budget_steps(cfg, progress, "unlearndiff"):
            probs = z.detach().clamp_min(0)
            ids = torch.multinomial(probs.cpu() + 1e-12, 1, generator=gen).squeeze(1).to(z.device)
            hard = torch.nn.functional.one_hot(ids, len(allowed)).to(z.dtype)
            embeds = (hard + z - z.detach()) @ sub  # straight-through: forward the sample, gradient to z
            values: list[torch.Tensor | None] = [None] * len(slots.encoders)
            values[main] = embeds
            idx = torch.randint(0, len(ref.x0), (cfg.batch,), generator=gen)
            with slots.active(values), adapter.text_gradients():
                cond = adapter.conditioning([adv[int(i)] for i in ref.x0_prompt[idx]])
            loss = _denoising_loss(handle, ref, cond, idx, gen)
            check_loss(loss, step, "unlearndiff")
            opt.zero_grad()
            loss.backward()
            check_gradients(opt, step, "unlearndiff")
            z.grad = z.grad.clamp(-1, 1)  # UnlearnDiffAtk's hardtanh on the straight-through gradient
            opt.step()
            with torch.no_grad():
                z.copy_(simplex_projection(z))
            if step in points:
                best = allowed[z.detach().argmax(-1)].tolist()
                text = decode_tokens(tok, best)
                attacked = [f"{text} {p}".strip() for p in prompts]
                report(step, Candidate(attacked, attacked, detail={"tokens": best, "text": text,
                                                                   "loss": float(loss.detach())}))


