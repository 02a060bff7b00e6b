"""The attacks a user can run, what level each acts on, its budget unit, and one validated config per run.

Levels (docs/attacks.md): ``token`` — the attack's result is a text prompt a user could type
(realistic); ``word`` — it sets word embeddings that still pass through the text encoder (textual inversion,
AdvUnlearn's attack); ``conditioning`` — it sets the denoiser's text conditioning directly, which inverts any
closed-form edit exactly (an upper bound, labelled as such in every table).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TraceEraseError

LEVELS = ("token", "word", "conditioning")
LEVEL_NOTES = {"token": "a text prompt a user could type", "word": "word embeddings through the text encoder",
               "conditioning": "the denoiser's conditioning directly: an upper bound, not a user's attack"}


@dataclass(frozen=True)
class AttackKind:
    """An attack's levels (the first is its default), its default budget and what the budget counts."""

    levels: tuple[str, ...]
    budget: int
    unit: str
    lr: float = 0.0
    tokens: int = 3
    etas: tuple[float, ...] = ()
    needs_reference: bool = False  # optimises against the base model's trajectories (computed before the erasure)


ATTACKS: dict[str, AttackKind] = {
    # ours: the toy-robust prompt families (or a prompt file); budget = prompts per family
    "paraphrase": AttackKind(("token",), 8, "prompts per family"),
    # Ring-A-Bell, continuous form (RECE's port): E(neutral) + η·v; budget = templates averaged into v
    "concept-vector": AttackKind(("conditioning",), 10, "templates in the concept vector",
                                 etas=(0.5, 1.0, 2.0, 3.0, 5.0)),
    # Ring-A-Bell's genetic search for K whole-word tokens whose text features approach E(neutral) + η·v (η 3: its
    # notebook; K 16: its default); budget = generations (the original runs 3,000 with a population of 200)
    "ring-a-bell": AttackKind(("token",), 300, "generations", tokens=16, etas=(3.0,)),
    # AdvUnlearn's / P4D's objective on k prefix word embeddings (or the conditioning); budget = Adam steps
    "soft-prompt": AttackKind(("word", "conditioning"), 200, "optimisation steps", lr=1e-2, needs_reference=True),
    # P4D-N: 16 soft tokens projected to the vocabulary (PEZ), AdamW lr 0.1; budget = steps per scored template
    # ("lite": 100 × 3 templates; the original runs 3,000 per prompt)
    "p4d": AttackKind(("token",), 100, "optimisation steps per template", lr=0.1, tokens=16, needs_reference=True),
    # CCE: textual inversion of one new token through the erased model; budget = Adam steps
    "inversion": AttackKind(("word",), 300, "optimisation steps", lr=5e-3, tokens=1, needs_reference=True),
    # UnlearnDiffAtk: k discrete prefix tokens (relaxed one-hot, straight-through); budget = steps ("lite": 200)
    "unlearndiff": AttackKind(("token",), 200, "optimisation steps", lr=1e-2, needs_reference=True),
}


@dataclass(frozen=True)
class AttackConfig:
    """One attack run: which attack, at which level and budget, evaluated on ``seeds`` images per prompt.

    ``tokens``: adversarial slots (prefix tokens or inversion vectors); ``checkpoints``: budget points at which the
    attack's current result is generated and scored (the ASR-vs-budget curve); ``batch``: states per optimisation
    step; ``seed``: the optimisation's random generator (evaluation seeds are 0..seeds-1, the optimisation's own
    trajectories use other seeds)."""

    attack: str
    level: str | None = None
    budget: int | None = None
    seeds: int = 5
    tokens: int | None = None
    lr: float | None = None
    etas: tuple[float, ...] | None = None  # concept-vector's sweep (default 0.5–5), ring-a-bell's one η (default 3)
    population: int = 200  # ring-a-bell: prompts per generation (the original's)
    checkpoints: int = 3
    batch: int = 4
    trajectories: int = 8
    seed: int = 0
    prompts: str | None = None  # paraphrase: a prompt file (real models)
    neutral: str = "object"  # concept-vector: the word the concept is swapped for
    init_word: str = "shape"  # inversion: the new token's starting embedding

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise TraceEraseError(f"unknown --attack '{self.attack}'; choose {', '.join(ATTACKS)}")
        kind = ATTACKS[self.attack]
        if self.level is not None and self.level not in kind.levels:
            if self.level not in LEVELS:
                raise TraceEraseError(f"unknown --level '{self.level}'; choose {', '.join(LEVELS)}")
            raise TraceEraseError(f"--attack {self.attack} acts at the {'/'.join(kind.levels)} level, not "
                                  f"'{self.level}'; drop --level or pick another attack")
        for name, value, low in (("--budget", self.budget, 1), ("--seeds", self.seeds, 1),
                                 ("--tokens", self.tokens, 1), ("--checkpoints", self.checkpoints, 1),
                                 ("--batch", self.batch, 1), ("--trajectories", self.trajectories, 1),
                                 ("--population", self.population, 2)):
            if value is not None and int(value) < low:
                raise TraceEraseError(f"{name} must be at least {low} (got {value})")
        if self.lr is not None and not self.lr > 0:
            raise TraceEraseError(f"--lr must be positive (got {self.lr})")
        if self.etas is not None:
            if self.attack not in ("concept-vector", "ring-a-bell"):
                raise TraceEraseError("--etas applies to --attack concept-vector and ring-a-bell")
            if not self.etas or any(not e > 0 for e in self.etas):
                raise TraceEraseError(f"--etas must be positive numbers (got {', '.join(map(str, self.etas))})")
            if self.attack == "ring-a-bell" and len(self.etas) != 1:
                raise TraceEraseError(f"--attack ring-a-bell searches towards one target; pass one value to --etas "
                                      f"(got {len(self.etas)})")
        if self.attack == "p4d" and self.trajectories < 3:
            raise TraceEraseError(f"--attack p4d optimises one prompt per scored template (3) on that template's own "
                                  f"trajectories; set trajectories to 3 or more (got {self.trajectories})")
        if self.prompts is not None and self.attack != "paraphrase":
            raise TraceEraseError("--prompts applies to --attack paraphrase")

    @property
    def kind(self) -> AttackKind:
        return ATTACKS[self.attack]

    @property
    def the_level(self) -> str:
        return self.level or self.kind.levels[0]

    @property
    def the_budget(self) -> int:
        return int(self.budget or self.kind.budget)

    @property
    def the_tokens(self) -> int:
        return int(self.tokens or self.kind.tokens)

    @property
    def the_etas(self) -> tuple[float, ...]:
        return tuple(self.etas or self.kind.etas)

    @property
    def the_lr(self) -> float:
        return float(self.lr or self.kind.lr)

    def budget_points(self) -> list[int]:
        """The budgets at which an optimising attack's result is scored: ``checkpoints`` evenly spaced, ending at
        the budget."""
        b, n = self.the_budget, min(self.checkpoints, self.the_budget)
        return sorted({max(1, round(b * (i + 1) / n)) for i in range(n)})

    def describe(self) -> dict:
        """The settings recorded in results.json."""
        return {"attack": self.attack, "level": self.the_level, "level_note": LEVEL_NOTES[self.the_level],
                "budget": self.the_budget, "budget_unit": self.kind.unit, "seeds": self.seeds,
                "tokens": self.the_tokens, "lr": self.the_lr, "etas": list(self.the_etas),
                "budget_points": self.budget_points(), "batch": self.batch, "trajectories": self.trajectories,
                "optimisation_seed": self.seed, "prompts": self.prompts, "neutral": self.neutral,
                "init_word": self.init_word,
                **({"population": self.population} if self.attack == "ring-a-bell" else {})}
