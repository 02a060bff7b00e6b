"""The adversarial-prompt defence inside stage B (engines/adversarial.py) on tiny SD1.x and FLUX fixtures."""

from __future__ import annotations

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.config import Concept
from trace_erase.engines.adversarial import AdversarialPrompts
from trace_erase.engines.pool import Pool
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.errors import TraceEraseError

from .conftest import BUILDERS, stop_after_first_checkpoint

FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2, "checkpoint_every": 1000}


def _engine(name: str, **kw) -> TrajectoryEngine:
    return TrajectoryEngine(get_adapter(BUILDERS[name]()), TrajectoryConfig.from_options(**{**FAST, **kw}),
                            progress=False)


def _times(eng: TrajectoryEngine) -> torch.Tensor:  # one EARLY and one LATE state
    return torch.tensor([900, 100]) if eng.adapter.time_kind == "ddpm" else torch.tensor([0.9, 0.1])


def test_adversarial_term_is_the_erase_loss_on_the_adversarial_conditioning() -> None:
    """With the adversarial conditioning replaced by the concept prompt's own, the adversarial term equals the erase
    term (same target, same LATE mask), and the total counts it with ``adversarial_weight``."""
    totals = {}
    for weight in (0.0, 2.0):
        eng = _engine("sd", adversarial_every=1, adversarial_weight=weight, window="two")
        eng.attach()
        try:
            with torch.no_grad():
                for p in eng.lora_parameters():
                    p.add_(0.05)
            prompts = ["a photo of a cat"] * 2
            eng.adversarial = AdversarialPrompts(eng, [Concept("cat")])
            eng.adversarial.cond = eng.cond  # the slots' conditioning := the concept's own
            x = torch.randn(eng.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
            terms = eng.loss_terms(x, _times(eng), prompts, [])
            assert terms["erase"] > 0
            assert float(terms["adv"].detach()) == pytest.approx(float(terms["erase"].detach()), rel=1e-5)
            totals[weight] = (float(terms["total"]), float(terms["adv"]))
        finally:
            eng.detach()
    assert totals[2.0][0] - totals[0.0][0] == pytest.approx(2.0 * totals[2.0][1], rel=1e-4)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_inner_attack_lowers_its_objective_and_changes_the_conditioning(name) -> None:
    """The inner soft-prompt attack moves every encoder's slots (CLIP, and T5 for FLUX) so that the model being
    trained matches θ0's concept predictions better than the filler word did."""
    eng = _engine(name, adversarial_every=1, adversarial_steps=10, adversarial_lr=1e-1, pool_trajectories=2)
    concepts = [Concept("cat")]
    eng.attach()
    try:
        with torch.no_grad():  # a model that differs from θ0
            for p in eng.lora_parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        pool = Pool()
        eng.fill_pool(pool, concepts)
        adv = AdversarialPrompts(eng, concepts)
        x = torch.cat([tr.states for tr in pool.trajectories]).to(eng.adapter.dtype)
        t = torch.cat([tr.times for tr in pool.trajectories])
        prompts = [tr.prompt for tr in pool.trajectories for _ in range(len(tr.states))]

        def objective() -> float:
            with torch.no_grad():
                with eng.original():
                    target = eng.adapter.predict(x, t, eng.cond(prompts))
                return float((eng.adapter.predict(x, t, adv.cond(prompts)) - target).pow(2).mean())

        before, init = objective(), [v.clone() for v in adv.values["cat"]]
        adv.attack(pool)
        after = objective()
        assert after < 0.9 * before, (before, after)
        assert len(adv.values["cat"]) == len(eng.adapter.text_encoders())
        assert all((v - v0).abs().max() > 1e-3 for v, v0 in zip(adv.values["cat"], init, strict=True))
        assert not any(p.grad is not None and p.grad.abs().max() > 0 for p in eng.lora_parameters())
    finally:
        eng.detach()


def test_interrupted_adversarial_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch) -> None:
    """The slots are part of the checkpoint: stopping after step 2 and resuming gives the uninterrupted LoRA."""
    opts = dict(FAST, steps=4, checkpoint_every=2, adversarial_every=2, adversarial_steps=3, pool_trajectories=2,
                refresh_every=3, templates=["{}"])
    full = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, **opts)
    stop_after_first_checkpoint(monkeypatch, lambda: erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog",
                                                           progress=False, workdir=tmp_path, **opts))
    resumed = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir=tmp_path,
                    **opts)
    assert resumed.manifest["trajectory_log"]["adversarial_losses"].keys() == {"cat"}
    for k, v in full.state_dict.items():
        assert (resumed.state_dict[k] - v).abs().max() <= 1e-6, k


@pytest.mark.parametrize("option, value, message", [
    ("adversarial_every", -1, "adversarial_every must be ≥ 0"),
    ("adversarial_steps", 0, "adversarial_steps must be ≥ 1"),
    ("adversarial_tokens", 0, "adversarial_tokens must be ≥ 1"),
    ("adversarial_lr", 0.0, "adversarial_lr must be > 0"),
    ("adversarial_weight", -1.0, "adversarial_weight must be ≥ 0"),
])
def test_bad_adversarial_options(option, value, message) -> None:
    with pytest.raises(TraceEraseError, match=message):
        TrajectoryConfig.from_options(**{option: value})


def test_bench_sweeps_an_integer_option_and_refuses_a_bad_value_before_loading(tmp_path, capsys) -> None:
    """``--sweep adversarial_every=10,25`` keeps integers (integer options refuse 25.0); a bad value is one line."""
    from trace_erase.benchmark.bench import parse_sweep
    from trace_erase.cli import main

    assert parse_sweep("adversarial_every=10,25") == [{"adversarial_every": 10}, {"adversarial_every": 25}]
    assert all(type(r["adversarial_every"]) is int for r in parse_sweep("adversarial_every=10,25"))
    assert parse_sweep("tau=0.3,0.5") == [{"tau": 0.3}, {"tau": 0.5}]
    assert parse_sweep("fusion_observed_grams=true,false") == [{"fusion_observed_grams": True},
                                                               {"fusion_observed_grams": False}]
    assert parse_sweep("adversarial_every=25+adversarial_tokens=1,3") == [
        {"adversarial_every": 25, "adversarial_tokens": 1}, {"adversarial_every": 25, "adversarial_tokens": 3}]
    code = main(["bench", "--model", "toy-sd", "--output", str(tmp_path / "o"), "--methods", "trace",
                 "--sweep", "adversarial_every=-5"])
    err = capsys.readouterr().err
    assert code == 2 and "adversarial_every must be ≥ 0" in err and len(err.strip().splitlines()) == 1, err


def test_each_concepts_own_slots_with_per_concept_loras() -> None:
    """With several concepts and per-concept LoRAs (TRACE's fuse), each concept's LoRA trains against its own
    adversarial slots, and the manifest records each inner attack's last loss."""
    er = erase(BUILDERS["sd"](), ["cat", "car"], method="trace", progress=False, multi="fuse", templates=["{}"],
               **{**FAST, "adversarial_every": 1, "adversarial_steps": 2})
    losses = er.manifest["trajectory_log"]["adversarial_losses"]
    assert set(losses) == {"cat", "car"} and all(v > 0 for v in losses.values())
