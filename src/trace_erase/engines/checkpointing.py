"""Stage-B checkpoints: everything a resumed run needs to continue bit-identically (LoRA, optimizer, generator,
replay pool, the defence's slots, the bank branch's entries), refused when the run's settings differ."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifacts.checkpoint import load_checkpoint as read_checkpoint
from ..artifacts.checkpoint import save_checkpoint as write_checkpoint
from ..config import config_hash, differing_keys
from ..errors import TraceEraseError
from .pool import Pool

CHECKPOINT_NAME = "trajectory_checkpoint.pt"


class CheckpointMixin:
    """Saving and resuming for :class:`~trace_erase.engines.trajectory.TrajectoryEngine`."""

    workdir: Path | None
    run_config: dict[str, Any]
    adapter: Any
    scaler: Any
    gen: torch.Generator
    adversarial: Any
    bank: Any
    named_lora_parameters: Callable[[], dict[str, torch.nn.Parameter]]

    def _ckpt(self) -> Path | None:
        return self.workdir / CHECKPOINT_NAME if self.workdir else None

    def save_checkpoint(self, step: int, opt: torch.optim.Optimizer, pool: Pool) -> None:
        path = self._ckpt()
        if path is None:
            return
        state = {
            "run_config": self.run_config,
            "run_hash": config_hash(self.run_config),
            "step": step,
            "lora": {n: p.detach().cpu().clone() for n, p in self.named_lora_parameters().items()},
            "opt": opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "gen": self.gen.get_state(),
            "pool": pool.state_dict(),
            "adversarial": self.adversarial.state_dict() if self.adversarial is not None else None,
            "bank": self.bank.state_dict() if self.bank is not None else None,
        }
        write_checkpoint(path, state)  # atomic and checksummed: a kill mid-write keeps the previous checkpoint

    def load_checkpoint(self, opt: torch.optim.Optimizer) -> tuple[int, Pool] | None:
        path = self._ckpt()
        if path is None or not path.exists():
            return None
        state = read_checkpoint(path)
        if not isinstance(state, dict) or "step" not in state or "lora" not in state:
            raise TraceEraseError(f"'{path}' is not a stage-B checkpoint; delete it or rerun with --overwrite")
        if state.get("run_hash") != config_hash(self.run_config):
            changed = ", ".join(differing_keys(state.get("run_config") or {}, self.run_config))
            raise TraceEraseError(f"--resume with different settings ({changed or 'an older checkpoint'}) than the "
                                  "interrupted run; rerun them unchanged, or --overwrite")
        params = self.named_lora_parameters()
        with torch.no_grad():
            for n, v in state["lora"].items():
                params[n].copy_(v)
        opt.load_state_dict(state["opt"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        if self.adversarial is not None and state.get("adversarial"):
            self.adversarial.load_state_dict(state["adversarial"])
        if self.bank is not None and state.get("bank"):  # the bank found before the interruption: no new search
            self.bank.load_state_dict(state["bank"])
        return int(state["step"]), Pool.from_state(state["pool"])
