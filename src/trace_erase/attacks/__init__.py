"""Attacks on erased models: paraphrase, concept-vector, soft-prompt, inversion and unlearndiff, at the token, word
or conditioning level, each scored against the base model under the same attack (``trace-erase attack``)."""

from .config import ATTACKS, LEVELS, AttackConfig
from .run import run_attack

__all__ = ["ATTACKS", "LEVELS", "AttackConfig", "run_attack"]
