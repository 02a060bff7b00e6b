"""ANT's and TRACE's stage B at their defaults, pinned to values computed before the trajectory engine's window
options existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trace_erase import get_adapter
from trace_erase.api import method_configs
from trace_erase.config import Concept
from trace_erase.engines.trajectory import TrajectoryEngine
from trace_erase.methods import get_method

from .conftest import BUILDERS

PINNED = Path(__file__).parent / "data" / "trajectory_defaults_pinned.json"
PIN = {"steps": 3, "rollout_steps": 10, "pool_trajectories": 2, "batch_size": 2, "checkpoint_every": 1000,
       "refresh_every": 2}


def _pinned_run(method: str) -> dict:
    """What the pinned data holds for ``method``'s stage-B config: the loss terms on a fixed batch (LoRA away from
    zero) and a 3-step training run's final losses and LoRA weights."""
    tr = method_configs(get_method(method), dict(PIN))[1]
    torch.manual_seed(0)
    eng = TrajectoryEngine(get_adapter(BUILDERS["sd"]()), tr, progress=False)
    out: dict = {}
    eng.attach()
    try:
        with torch.no_grad():
            for p in eng.lora_parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        x = torch.randn(eng.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
        terms = eng.loss_terms(x, torch.tensor([900, 100]), ["a photo of a cat"] * 2, [])
        out["fixed"] = {k: float(v.detach()) for k, v in terms.items() if float(v.detach()) != 0.0}
    finally:
        eng.detach()
    torch.manual_seed(0)
    log = TrajectoryEngine(get_adapter(BUILDERS["sd"]()), tr, progress=False).train([Concept("cat")])
    out["trained"] = {k: v for k, v in log["final_losses"].items() if v != 0.0}
    out["lora_abs_sum"] = float(sum(v.abs().sum() for v in log["state_dict"].values()))
    return out


@pytest.mark.parametrize("method", ["ant", "trace"])
def test_defaults_train_as_before_the_window_options(method) -> None:
    """At the defaults (keep_end=noisy, window_sampling=pool) ant's and trace's stage B compute the loss terms and
    train the weights the code before these options computed (tests/data holds its values), and their option keys
    are not written, so run hashes and resumes are unchanged."""
    want = json.loads(PINNED.read_text())[method]
    got = _pinned_run(method)
    for part in ("fixed", "trained"):
        assert set(got[part]) == set(want[part]), part
        for key, value in want[part].items():
            assert got[part][key] == pytest.approx(value, rel=1e-5, abs=1e-12), (part, key)
    assert got["lora_abs_sum"] == pytest.approx(want["lora_abs_sum"], rel=1e-6)
    options = method_configs(get_method(method), {})[1].options()
    assert "keep_end" not in options and "window_sampling" not in options
