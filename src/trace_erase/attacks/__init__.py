"""Attacks on erased models — paraphrase, concept-vector, ring-a-bell, soft-prompt, inversion, unlearndiff and p4d, at
the token, word or conditioning level — each scored against the base model under the same attack
(``trace-erase attack``). :mod:`.registry` maps a name to its function; :mod:`.optimisers` holds what they share."""

from .config import ATTACKS, LEVELS, AttackConfig
from .run import run_attack

__all__ = ["ATTACKS", "LEVELS", "AttackConfig", "run_attack"]
