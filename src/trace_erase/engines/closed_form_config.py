"""The closed-form engine's options (TRACE stage A's defaults; UCE, MACE-CFR and TRCE's stage 1 override a few) and
their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TraceEraseError
from .positions import TOKEN_SELECTIONS
from .prompts import check_templates


@dataclass
class ClosedFormConfig:
    """Knobs of the closed-form engine (defaults are TRACE stage A's; methods override a few)."""

    token_selection: str = "surrounding"  # which token positions carry the concept (see TOKEN_SELECTIONS)
    templates: list[str] | None = None  # prompt augmentation; None → DEFAULT_TEMPLATES (~30)
    # also the concept inside generic colour / texture / setting phrases (prompts.ATTRIBUTE_TEMPLATES; ours): the
    # erase rows and the preserved prompts both get them
    attribute_contexts: bool = False
    # automatic neighbour preservation (engines/neighbours.py; ours): after a first solve, the `neighbours` words the
    # edit moves most join the preserved prompts, and it solves again; a word moved ≥ `neighbour_synonym` × the
    # concept's own share, or as similar as `neighbour_similarity`, is the concept's synonym and is left erased.
    # Candidates: the model's CLIP whole-word tokens ("model": the `neighbour_pool` nearest the concept's tokens in
    # the embedding table) or a word file.
    neighbours: int = 0
    neighbour_vocab: str = "model"
    neighbour_pool: int = 256
    neighbour_synonym: float = 0.5
    neighbour_similarity: float = 0.8
    suffix_tokens: int | None = None  # positions after the concept to map (None: all, padding included)
    lambda_reg: float = 0.1  # λ: pull towards the original weights (keeps the solve well-posed)
    lambda_preserve: float = 1.0  # λ_p: weight of each preserved feature row
    preserve_corpus: str | None = None  # text file, one caption per line, or "builtin": all their tokens are preserved
    probe_prompts: list[str] | None = None  # unrelated prompts for the collateral certificate
    targets: str = "default"  # which projections (adapter-specific: 'kv' for UNets, 'context' for FLUX)
    rank_tolerance: float = 1e-6  # singular values below this × the largest are dropped in the LoRA export
    batch_size: int = 32  # prompts encoded per text-encoder call
    # RECE-style rounds (engines/rece.py; ours): after each solve, erase the conditioning the edited projections
    # still map onto the concept, found in closed form with a ridge of rece_lambda × the mean eigenvalue
    rece_rounds: int = 0
    rece_lambda: float = 0.01
    # TRCE's token classes (token_selection="trce"): weights of the start token, the first end token, the last position
    # (× the positions after the first end token) and the concept's tokens; None: TRCE's (0, 1, 0, 0)
    token_weights: list[float] | None = None
    # statistics as means, TRCE's scaling: erase rows over the (concept, anchor) prompt pairs, preserved rows over the
    # preserved prompts, so λ_p weighs the preserved prompts' mean Gram against the pairs' mean Gram
    mean_statistics: bool = False

    # fields added after runs were first checkpointed: left out of a run's settings hash at their defaults, so an
    # interrupted run made before them still resumes
    LATER_FIELDS = ("token_weights", "mean_statistics", "attribute_contexts", "neighbours", "neighbour_vocab",
                    "neighbour_pool", "neighbour_synonym", "neighbour_similarity")

    def run_settings(self) -> dict[str, Any]:
        """The settings a stage-B checkpoint's hash covers."""
        defaults = ClosedFormConfig()
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in self.LATER_FIELDS and v == getattr(defaults, k))}

    def __post_init__(self) -> None:
        if self.token_selection not in TOKEN_SELECTIONS:
            raise TraceEraseError(
                f"unknown token_selection '{self.token_selection}'; choose one of {', '.join(TOKEN_SELECTIONS)}"
            )
        if self.lambda_reg < 0:
            raise TraceEraseError(f"lambda_reg must be ≥ 0 (got {self.lambda_reg})")
        if self.lambda_preserve < 0:
            raise TraceEraseError("lambda_preserve must be ≥ 0")
        if self.lambda_reg == 0 and not (self.preserve_corpus and self.lambda_preserve > 0):
            raise TraceEraseError("lambda_reg=0 needs a preserve_corpus with lambda_preserve > 0 to keep the normal "
                                  "equations well-posed; set lambda_reg > 0 (e.g. 0.1) or preserve_corpus=builtin")
        if self.token_weights is not None:
            if self.token_selection != "trce":
                raise TraceEraseError("token_weights weigh TRCE's token classes; set token_selection=trce as well")
            if len(self.token_weights) != 4 or min(self.token_weights) < 0 or not any(self.token_weights):
                raise TraceEraseError(f"token_weights takes 4 weights ≥ 0, not all 0 (start, first end, last end, "
                                      f"key), not {self.token_weights}")
        if self.batch_size < 1:
            raise TraceEraseError(f"batch_size must be ≥ 1 (got {self.batch_size})")
        if self.suffix_tokens is not None and self.suffix_tokens < 0:
            raise TraceEraseError(f"suffix_tokens must be ≥ 0 or null (got {self.suffix_tokens})")
        if self.rece_rounds < 0:
            raise TraceEraseError(f"rece_rounds must be ≥ 0 (got {self.rece_rounds})")
        if not self.rece_lambda > 0:
            raise TraceEraseError(f"rece_lambda must be > 0 (got {self.rece_lambda}); it keeps the search well-posed")
        if not 0 <= self.rank_tolerance < 1:
            raise TraceEraseError(f"rank_tolerance must be in [0, 1) (got {self.rank_tolerance})")
        if self.templates is not None:
            self.templates = check_templates(self.templates)
        if self.neighbours < 0 or self.neighbour_pool < 1:
            raise TraceEraseError(f"neighbours must be ≥ 0 (0: off) and neighbour_pool ≥ 1 (got {self.neighbours}, "
                                  f"{self.neighbour_pool})")
        if not self.neighbour_synonym > 0 or not -1 < self.neighbour_similarity <= 1:
            raise TraceEraseError(f"neighbour_synonym must be > 0 and neighbour_similarity in (-1, 1] (got "
                                  f"{self.neighbour_synonym}, {self.neighbour_similarity}); e.g. 0.5 and 0.8")
        tuned = [f.name for f in dataclasses.fields(self)
                 if f.name.startswith("neighbour_") and getattr(self, f.name) != f.default]
        if tuned and not self.neighbours:
            raise TraceEraseError(f"{tuned[0]} has no effect with neighbours=0 (the default of this method and "
                                  "model kind); add --option neighbours=8, or drop it")
        if self.neighbours and self.neighbour_vocab != "model" and not Path(self.neighbour_vocab).is_file():
            raise TraceEraseError(f"neighbour_vocab '{self.neighbour_vocab}' does not exist; give a text file of "
                                  "words, or 'model'")
