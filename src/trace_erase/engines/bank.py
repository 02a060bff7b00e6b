"""The bank branch of stage B: search once for adversarial conditionings against the stage-A model, then erase them
in the same training run (after STEREO, arXiv 2408.16807: "search thoroughly enough, robustly erase once").

**Search** (before stage B's first step, once per run; a resumed run reads the bank from its checkpoint). Per
concept, ``bank_size`` entries, each from its own start, against θ* — stage A on, the LoRA off:

- *soft prompt*: ``bank_tokens`` prefix word embeddings; θ* under "<slots> {prompt}" should predict what θ0 predicts
  under "{prompt}" — the defence's inner-attack objective (engines/adversarial.py, reused, not copied);
- *inversion*: one new word vector in place of the concept's name in each training template ("a photo of <v>");
  θ* under it should predict what θ0 predicts under the concept prompt ("a photo of {concept}").

Both objectives are taken on states of the replay pool (every time), the states stage B trains on. The entries differ
by their start (the first of each kind starts at the slots' filler word, the test-time soft-prompt attack's start;
the rest at random vocabulary words), by kind, and by the states and templates their steps draw.

**Erase once.** Branch ``bank``: each row of a training batch draws an entry of its concept's bank (the engine's
generator), and the trained model's prediction at that entry's conditioning for the row's prompt is pulled to the
concept prompt's erase target — in both windows, with weight ``bank_weight``. No attack runs during training.

What is STEREO's: the two phases (a bank of adversarial embeddings first, one erasure against all of them after),
inversion-style embeddings in the bank. What is ours: the entries are all searched against the same stage-A model
(STEREO alternates erasing and attacking, each attack against the model erased against the previous ones: here the
diversity comes from the starts and the two kinds); soft prompts besides inversions; the inversion matches θ0's
predictions on the pool's states instead of textual inversion's denoising loss on images of the concept (the pool
holds θ*'s trajectories, whose final latents no longer show the concept, and θ0's predictions are what the engine
already computes); the target is the concept prompt's erase target as the engine builds it (reversed guidance, or the
anchor form with ``reference=anchor``, the nearest to STEREO's anchor-based compositional target), where STEREO
trains towards ε(∅) − s·Σ(ε(concepts) − ε(∅)) + s·(ε(anchor) − ε(∅)) with adaptive projected guidance; and the branch
is one term of TRACE's stage B, beside its keep and unconditional terms, not a separate fine-tune.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..config import Concept
from ..errors import TraceEraseError
from ..models.base import Conditioning
from ..models.injection import WordSlots
from .adversarial import descend_slots, match_original_loss
from .pool import Pool, Trajectory

if TYPE_CHECKING:
    from .protocol import StageBEngine
    from .trajectory_config import TrajectoryConfig

KINDS = ("soft-prompt", "inversion")


def check_bank(config: TrajectoryConfig | None, stage_a: bool) -> None:
    """Refuse the bank before a model loads where it means nothing: a method without stage A (the search would run
    against the original model, which every prompt already matches)."""
    if config is None or config.bank is None or stage_a:
        return
    raise TraceEraseError("bank_weight searches adversarial conditionings against the stage-A model, and this method "
                          "has no stage A; use --method trace (or trace-late-only), or drop bank_weight")


class Bank:
    """Per concept, the bank's entries (slot values of one kind each), searched once by :meth:`search` (or read back
    by :meth:`load_state_dict`), and their conditionings for the training prompts."""

    def __init__(self, engine: StageBEngine, concepts: list[Concept]):
        self.engine = engine
        self.cfg = engine.config.bank
        templates = engine.config.training_templates
        self.prompts = {t.format(c.name): (c.name, t) for c in concepts for t in templates}
        try:
            self.slots = {"soft-prompt": WordSlots(engine.adapter, self.cfg.tokens, list(self.prompts)),
                          "inversion": WordSlots(engine.adapter, 1, list(self.prompts))}
        except TraceEraseError as err:
            raise TraceEraseError(f"bank_weight places word slots in the prompts and cannot here ({err}); drop "
                                  "bank_weight") from None
        self.concepts = [c.name for c in concepts]
        # per concept: (kind, slot values) for each entry
        self.entries: dict[str, list[tuple[str, list[torch.Tensor]]]] = {}
        self.log: dict[str, Any] = {}
        self._cond: dict[tuple[int, str], Conditioning] = {}

    def text(self, kind: str, prompt: str) -> str:
        """The text an entry of ``kind`` is encoded from for training prompt ``prompt``."""
        if kind == "soft-prompt":
            return self.slots[kind].prefixed(prompt)
        return self.slots[kind].placed(self.prompts[prompt][1])

    def objective(self, kind: str, values: list[torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                  prompts: list[str]) -> torch.Tensor:
        """The search's loss for an entry of ``kind``: the model as it is now under the entry's texts against θ0
        under ``prompts`` (call it under ``engine.stage_a_model()`` to search against θ*)."""
        return match_original_loss(self.engine, self.slots[kind], values, x, t, prompts,
                                   [self.text(kind, p) for p in prompts])

    def search(self, pool: Pool) -> None:
        """Every concept's entries, against the stage-A model (LoRA off), from the pool's trajectories of that
        concept."""
        engine, cfg = self.engine, self.cfg
        for name in self.concepts:
            start, entries, losses = time.perf_counter(), [], []
            own, rows = self._states_of(pool, name)
            for kind, count in cfg.sizes().items():
                slots = self.slots[kind]
                for i in range(count):
                    init = slots.init_from(slots.filler) if i == 0 else slots.init_random(engine.gen)
                    with engine.stage_a_model():
                        values, trace = descend_slots(
                            engine, own, rows, slots, init,
                            lambda v, x, t, p, kind=kind: self.objective(kind, v, x, t, p),
                            cfg.steps, cfg.lr, "bank_lr")
                    entries.append((kind, values))
                    losses.append({"kind": kind, "first": trace[0], "last": trace[-1]})
            self.entries[name] = entries
            self.log[name] = {"seconds": time.perf_counter() - start, "entries": losses}
        self._encode()

    def _states_of(self, pool: Pool, name: str) -> tuple[Pool, list[int]]:
        """The pool and its rows whose trajectories are of concept ``name``; when the pool holds none (several
        concepts share a small pool), a pool of one trajectory of θ* under the concept's first template."""
        rows = [j for j, p in enumerate(pool.prompts) if self.prompts.get(p, ("",))[0] == name]
        if rows:
            return pool, rows
        prompt = next(p for p, (c, _) in self.prompts.items() if c == name)
        states, times, final = self.engine.rollout(prompt)
        own = Pool()
        own.add(Trajectory(states, times, prompt, final[0].detach().cpu()))
        return own, [0]

    def _encode(self) -> None:
        """Each entry's conditioning for each of its concept's training prompts (no gradients)."""
        adapter = self.engine.adapter
        self._cond = {}
        with torch.no_grad():
            for name, entries in self.entries.items():
                prompts = [p for p, (c, _) in self.prompts.items() if c == name]
                for j, (kind, values) in enumerate(entries):
                    with self.slots[kind].active(values):
                        cond = adapter.conditioning([self.text(kind, p) for p in prompts])
                    self._cond.update({(j, p): cond.select([i]) for i, p in enumerate(prompts)})

    def draw(self, prompts: list[str]) -> Conditioning:
        """A bank conditioning for each training prompt: an entry of its concept's bank, drawn with the engine's
        generator."""
        picks = torch.randint(0, self.cfg.size, (len(prompts),), generator=self.engine.gen)
        return Conditioning.cat([self._cond[(int(j), p)] for j, p in zip(picks, prompts, strict=True)])

    def state_dict(self) -> dict[str, Any]:
        return {"entries": {n: [(k, [v.cpu() for v in vs]) for k, vs in es] for n, es in self.entries.items()},
                "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.engine.adapter.device
        self.entries = {n: [(k, [v.to(device) for v in vs]) for k, vs in es] for n, es in state["entries"].items()}
        self.log = dict(state.get("log", {}))
        self._encode()

    @property
    def searched(self) -> bool:
        """Whether the bank holds its entries (searched now, or read from a checkpoint)."""
        return bool(self.entries)
