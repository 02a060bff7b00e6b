"""The readings of ANT's code as trajectory-engine options: which end of the trajectory the field is kept at
(``keep_end``), how a batch is shared between the windows (``window_sampling``), and the defaults they leave alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.api import method_configs
from trace_erase.config import Concept
from trace_erase.engines.pool import Pool, Trajectory
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.errors import TraceEraseError
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


def _targets_per_state(keep_end: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """ANT's terms (positive guidance, η = 1.5, no unconditional term) on a batch of one clean-end state (t = 100)
    and one noisy-start state (t = 900), τ = 0.5; with each state's loss against each target, computed here."""
    eng = TrajectoryEngine(get_adapter(BUILDERS["sd"]()), TrajectoryConfig.from_options(
        steps=1, rollout_steps=4, pool_trajectories=1, batch_size=2, window="two", early_mode="positive", eta=1.5,
        beta=1.0, gamma=0.0, tau=0.5, keep_end=keep_end), progress=False)
    x = torch.randn(eng.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 900])
    prompts = ["a photo of a cat"] * 2
    eng.attach()
    try:
        with torch.no_grad():  # a LoRA away from zero, so that the live prediction is not the frozen one
            for p in eng.lora_parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            live = eng.adapter.predict(x, t, eng.cond(prompts))
            with eng.stage_a_model():
                e_c = eng.adapter.predict(x, t, eng.cond(prompts))
                e_u = eng.adapter.predict(x, t, eng.cond(["", ""]))
        terms = {k: float(v.detach()) for k, v in eng.loss_terms(x, t, prompts, []).items()}
    finally:
        eng.detach()
    per = lambda a, b: (a - b).pow(2).flatten(1).mean(1).tolist()  # noqa: E731
    return terms, {"positive": per(live, e_u + 1.5 * (e_c - e_u)), "reversed": per(live, e_u - 1.5 * (e_c - e_u))}


@pytest.mark.parametrize("keep_end", ["noisy", "clean"])
def test_keep_end_decides_which_state_gets_which_target(keep_end) -> None:
    """keep_end=noisy: the noisy state (t = 900) learns the positive target, the clean one (t = 100) the reversed
    one; keep_end=clean swaps them. Fails if the windows were the other way round."""
    terms, loss = _targets_per_state(keep_end)
    keep, rev = (1, 0) if keep_end == "noisy" else (0, 1)  # index of the state in the keep / erase window
    assert terms["early"] == pytest.approx(loss["positive"][keep] / 2, rel=1e-5)
    assert terms["erase"] == pytest.approx(loss["reversed"][rev] / 2, rel=1e-5)
    for wrong, right in ((loss["positive"][rev], terms["early"] * 2), (loss["reversed"][keep], terms["erase"] * 2)):
        assert abs(wrong - right) > 0.05 * right, (wrong, right)
    assert terms["unc"] == 0.0 and terms["total"] == pytest.approx(terms["erase"] + terms["early"], rel=1e-6)


def _pool(adapter, steps: int = 50) -> Pool:
    """Two trajectories over a 50-step schedule of the time range, each state filled with its step's time."""
    times = torch.linspace(adapter.time_scale * 0.98, adapter.time_scale * 0.001, steps)
    shape = adapter.latent_shape(1)[1:]
    return Pool([Trajectory(torch.stack([torch.full(shape, float(t)) for t in times]), times, f"p{i}")
                 for i in range(2)])


@pytest.mark.parametrize("keep_end", ["noisy", "clean"])
def test_balanced_sampling_draws_half_of_each_batch_from_each_window(keep_end) -> None:
    """window_sampling=balanced: a batch of 6 holds 3 keep-window states, then 3 erase-window ones, although the
    keep window (τ = 0.14 at the clean end, or 0.86's complement at the noisy start) is 7 of the 50 steps; the pool
    sampling it replaces draws far fewer from the short window."""
    adapter = get_adapter(BUILDERS["sd"]())
    tau = 0.14 if keep_end == "clean" else 0.86
    common = {"steps": 1, "batch_size": 6, "window": "two", "tau": tau, "keep_end": keep_end}
    pool = _pool(adapter)
    keep_side = keep_end == "clean"  # is_late of the keep window's states
    assert int((adapter.is_late(pool.trajectories[0].times, tau) == keep_side).sum()) == 7
    balanced = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**common, window_sampling="balanced"),
                                progress=False)
    for _ in range(10):
        x, t, _ = balanced.sample(pool)
        in_keep = (adapter.is_late(t, tau) == keep_side).tolist()
        assert in_keep == [True] * 3 + [False] * 3, t
        assert torch.equal(x[:, 0, 0, 0].float(), t.float())  # each state is its own step's
    plain = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**common), progress=False)
    drawn = torch.cat([plain.sample(pool)[1] for _ in range(40)])
    share = float((adapter.is_late(drawn, tau) == keep_side).float().mean())
    assert share < 0.3, share  # 7/50 in expectation


def test_ant_trains_with_the_single_concept_code_reading(tmp_path) -> None:
    """ANT with its single-concept code's window and balance runs end to end, and the erasure records both options
    (they are left out of the record only at their defaults)."""
    er = erase(BUILDERS["sd"](), ["cat"], method="ant", progress=False, steps=2, rollout_steps=8,
               pool_trajectories=1, batch_size=2, checkpoint_every=1000, keep_end="clean", tau=0.14,
               window_sampling="balanced")
    options = er.manifest["config"]["trajectory"]
    assert options["keep_end"] == "clean" and options["window_sampling"] == "balanced"
    assert er.manifest["trajectory_log"]["final_losses"]["early"] > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"keep_end": "start"}, "unknown keep_end 'start'; choose one of noisy, clean"),
    ({"window_sampling": "even"}, "unknown window_sampling 'even'; choose one of pool, balanced"),
    ({"keep_end": "clean", "window": "all", "tau": 0.14},
     "keep_end=clean moves the keep term of window=two; set window=two"),
    ({"keep_end": "clean", "window": "late", "tau": 0.14}, "set window=two, or drop keep_end"),
    ({"keep_end": "clean", "tau": 0.86}, "keep_end=clean keeps the field at t < tau, here 0.86 of the time range; "
                                         "set tau to the clean end's share \\(ANT's single-concept code: tau=0.14\\)"),
    ({"keep_end": "clean", "tau": 0.14, "gate_tau": 0.5}, "drop gate_tau or keep_end"),
    ({"window_sampling": "balanced", "window": "all"}, "set window=two, or window_sampling=pool"),
    ({"window_sampling": "balanced", "batch_size": 3}, "set an even batch_size \\(e.g. 4\\)"),
])
def test_bad_window_options_are_refused_in_one_line(options, message) -> None:
    with pytest.raises(TraceEraseError, match=message) as info:
        TrajectoryConfig.from_options(**options)
    assert "\n" not in str(info.value)


def test_the_window_options_are_option_keys() -> None:
    keys = TrajectoryConfig.option_keys()
    assert "keep_end" in keys and "window_sampling" in keys
    cfg = TrajectoryConfig.from_options(keep_end="clean", tau=0.14, window_sampling="balanced")
    assert TrajectoryConfig.from_options(cfg.options()) == cfg
