"""The bank branch of stage B (engines/bank.py) on the tiny SD1.x fixture: the bank is searched once against the
stage-A model with the sizes and kinds its options say, the branch pulls the bank's predictions to the concept
prompt's erase target in both windows, it is off by default and refused where it cannot run, and an interrupted run
resumes to the same weights without searching again."""

from __future__ import annotations

import re

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.api import method_configs
from trace_erase.artifacts.checkpoint import load_checkpoint
from trace_erase.config import Concept
from trace_erase.engines.bank import Bank
from trace_erase.engines.closed_form import ClosedFormEngine
from trace_erase.engines.pool import Pool
from trace_erase.engines.stage_a import StageAWeights
from trace_erase.engines.trajectory import CHECKPOINT_NAME, TrajectoryEngine, reversed_guidance
from trace_erase.engines.trajectory_config import TrajectoryConfig
from trace_erase.errors import TraceEraseError
from trace_erase.methods import METHODS, get_method

from .conftest import BUILDERS, stop_after_first_checkpoint

CAT = [Concept("cat", anchor="dog")]
STAGE_A = {"templates": ["{}", "a photo of {}"], "preserve_corpus": None}
FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 2, "batch_size": 2, "checkpoint_every": 1000,
        "train_templates": ["{}", "a photo of {}"]}


def _stage_a(adapter) -> StageAWeights:
    cf = method_configs(get_method("trace"), STAGE_A)[0]
    return StageAWeights(adapter, ClosedFormEngine(adapter, cf, progress=False).run(CAT).deltas)


def _engine(adapter, stage_a: StageAWeights, **options) -> TrajectoryEngine:
    engine = TrajectoryEngine(adapter, method_configs(get_method("trace"), {**FAST, **options})[1], progress=False,
                              stage_a=stage_a)
    engine.concepts = CAT
    return engine


# ---- 1. the search ---------------------------------------------------------------------------------------------------
def test_search_runs_against_the_stage_a_model_and_follows_the_options() -> None:
    """The entries lower the search objective on the stage-A model from their start; a LoRA already away from zero
    changes nothing in them (the search switches it off); size, kinds and slot counts are the options'."""
    adapter = get_adapter(BUILDERS["sd"]())
    stage_a = _stage_a(adapter)
    opts = {"bank_weight": 1.0, "bank_size": 3, "bank_steps": 8, "bank_lr": 0.1, "bank_tokens": 2}
    banks, starts = [], {}
    with stage_a.applied():
        for lora in (0.0, 0.1):
            eng = _engine(adapter, stage_a, **opts)
            eng.attach()
            try:
                if lora:  # a model that differs from the stage-A one
                    with torch.no_grad():
                        for p in eng.lora_parameters():
                            p.normal_(0, lora, generator=torch.Generator().manual_seed(0))
                pool = Pool()
                eng.fill_pool(pool, CAT)
                bank = Bank(eng, CAT)
                bank.search(pool)
                banks.append(bank)
                # the objective on every pool state, on the stage-A model, for the first entry of each kind (both
                # start at the filler word) before and after its search
                x = torch.cat([tr.states for tr in pool.trajectories]).to(adapter.dtype)
                t = torch.cat([tr.times for tr in pool.trajectories])
                prompts = [tr.prompt for tr in pool.trajectories for _ in range(len(tr.states))]
                if not lora:
                    with torch.no_grad(), eng.stage_a_model():
                        for j, (kind, values) in enumerate(bank.entries["cat"]):
                            if j in (0, 2):
                                init = bank.slots[kind].init_from(bank.slots[kind].filler)
                                starts[kind] = (float(bank.objective(kind, init, x, t, prompts)),
                                                float(bank.objective(kind, values, x, t, prompts)))
            finally:
                eng.detach()
    for kind, (before, after) in starts.items():
        assert after < 0.8 * before, (kind, before, after)
    plain, perturbed = banks
    for (k0, v0), (k1, v1) in zip(plain.entries["cat"], perturbed.entries["cat"], strict=True):
        assert k0 == k1 and all(torch.equal(a, b) for a, b in zip(v0, v1, strict=True))
    assert [k for k, _ in plain.entries["cat"]] == ["soft-prompt", "soft-prompt", "inversion"]
    assert [v[0].shape[0] for _, v in plain.entries["cat"]] == [2, 2, 1]
    assert plain.text("inversion", "a photo of cat") == f"a photo of {plain.slots['inversion'].filler}"
    assert plain.text("soft-prompt", "cat").split()[:2] == [plain.slots["soft-prompt"].filler] * 2
    only = TrajectoryConfig.from_options(bank_weight=1.0, bank_size=3, bank_kinds="inversion").bank
    assert only.sizes() == {"inversion": 3}


# ---- 2. the branch's term --------------------------------------------------------------------------------------------
def test_bank_term_is_the_erase_target_at_the_bank_conditioning_in_both_windows() -> None:
    """Known answer on one EARLY and one LATE state with a one-entry bank: ``bank`` is the mean over both states of
    the distance between the trained model's prediction at the entry's conditioning and the erase target
    ε*(∅) − η(ε*(c) − ε*(∅)); the total counts it × bank_weight. (η = 20: the tiny model's text barely moves its
    prediction, so the erase target would otherwise sit next to ε*(c).)"""
    adapter = get_adapter(BUILDERS["sd"]())
    stage_a = _stage_a(adapter)
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 100])  # EARLY, LATE
    prompts = ["a photo of cat"] * 2
    terms = {}
    with stage_a.applied():
        for weight in (0.0, 2.0):
            eng = _engine(adapter, stage_a, eta=20.0, **({"bank_weight": weight, "bank_size": 1,
                                                          "bank_kinds": "soft-prompt"} if weight else {}))
            eng.attach()
            try:
                with torch.no_grad():
                    for p in eng.lora_parameters():
                        p.add_(0.05)
                    if weight:
                        eng.bank = Bank(eng, CAT)
                        values = [torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) * v.std()
                                  for v in eng.bank.slots["soft-prompt"].init_from("dog")]
                        eng.bank.load_state_dict({"entries": {"cat": [("soft-prompt", values)]}})
                    terms[weight] = eng.loss_terms(x, t, prompts, [])
                    if weight:
                        with eng.bank.slots["soft-prompt"].active(values):
                            b = adapter.conditioning([eng.bank.text("soft-prompt", p) for p in prompts])
                        pred = adapter.predict(x, t, b)
                        c, u = adapter.conditioning(prompts), adapter.conditioning([""] * 2)
                        with eng.stage_a_model():
                            e_c, e_u = adapter.predict(x, t, c), adapter.predict(x, t, u)
            finally:
                eng.detach()
    on, off = terms[2.0], terms[0.0]
    per = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
    target = reversed_guidance(e_u, e_c, e_u, 20.0)
    want = per(pred, target)
    assert float(on["bank"]) == pytest.approx(float(want.mean()), rel=1e-4)
    # both windows count; a flipped guidance sign or the concept's keep target would give other values
    assert abs(float(want[1]) / 2 - float(want.mean())) > 0.05 * float(want.mean())
    assert abs(float(per(pred, reversed_guidance(e_u, e_c, e_u, -20.0)).mean()) - float(want.mean())) > \
        0.05 * float(want.mean())
    assert abs(float(per(pred, e_c).mean()) - float(want.mean())) > 0.05 * float(want.mean())
    assert "bank" not in off and float(on["erase"]) == pytest.approx(float(off["erase"]), rel=1e-4)
    assert float(on["total"]) - float(off["total"]) == pytest.approx(2.0 * float(want.mean()), rel=1e-3)


# ---- 3. off by default, options, refusals ----------------------------------------------------------------------------
def test_off_by_default_and_round_trips() -> None:
    for name, spec in METHODS.items():
        _, tr = method_configs(spec, {})
        assert tr is None or (tr.bank is None and not any(k.startswith("bank_") for k in tr.options())), name
    on = TrajectoryConfig.from_options(bank_weight=1.0)
    assert {k: v for k, v in on.options().items() if k.startswith("bank_")} == {
        "bank_weight": 1.0, "bank_size": 16, "bank_kinds": "both", "bank_steps": 50, "bank_lr": 0.01,
        "bank_tokens": 3}
    assert TrajectoryConfig.from_options(on.options()) == on
    assert "bank_size" in TrajectoryConfig.option_keys()


@pytest.mark.parametrize("method, options, message", [
    ("trace", {"bank_weight": "-1"}, "bank_weight must be ≥ 0"),
    ("trace", {"bank_weight": "1", "bank_size": "0"}, "bank_size must be ≥ 1"),
    ("trace", {"bank_weight": "1", "bank_steps": "0"}, "bank_steps must be ≥ 1"),
    ("trace", {"bank_weight": "1", "bank_lr": "0"}, "bank_lr must be > 0"),
    ("trace", {"bank_weight": "1", "bank_kinds": "words"}, "unknown bank_kinds 'words'; choose one of both, "),
    ("trace", {"bank_weight": "1", "bank_size": "1"}, "bank_kinds=both splits the bank"),
    ("trace", {"bank_size": "8"}, "bank_size is read only when bank is on; set bank_weight > 0"),
    ("esd-x", {"bank_weight": "1"}, "has no stage A; use --method trace"),
    ("ant", {"bank_weight": "1"}, "has no stage A; use --method trace"),
])
def test_bad_input_is_one_line_and_exit_2_before_a_model_loads(tmp_path, capsys, method, options, message) -> None:
    from trace_erase.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    pairs = [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
    code = main(["erase", "--model", str(tmp_path / "m"), "--concept", "cat", "--method", method, *pairs,
                 "--output", str(tmp_path / "o")])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(re.escape(message), lines[0]), lines[0]


def test_a_pipeline_without_word_slots_is_refused_in_one_line(monkeypatch) -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    eng = _engine(adapter, None, bank_weight=1.0)
    monkeypatch.setattr(adapter, "text_encoders", lambda: [])
    with pytest.raises(TraceEraseError, match="bank_weight places word slots .*; drop bank_weight") as err:
        Bank(eng, CAT)
    assert "\n" not in str(err.value)


# ---- 4. resume -------------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights_without_searching_again(tmp_path, monkeypatch) -> None:
    opts = dict(FAST, steps=4, checkpoint_every=2, refresh_every=3, templates=["{}"], preserve_corpus=None,
                bank_weight=1.0, bank_size=2, bank_steps=3)
    full = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, **opts)
    log = full.manifest["trajectory_log"]
    assert log["final_losses"]["bank"] > 0 and len(log["bank_search"]["cat"]["entries"]) == 2
    assert full.manifest["config"]["trajectory"]["bank"]["size"] == 2
    stop_after_first_checkpoint(monkeypatch, lambda: erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog",
                                                           progress=False, workdir=tmp_path, **opts))
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2 and [k for k, _ in state["bank"]["entries"]["cat"]] == ["soft-prompt", "inversion"]
    searched = []
    search = Bank.search
    monkeypatch.setattr(Bank, "search", lambda self, pool: searched.append(1) or search(self, pool))
    resumed = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir=tmp_path,
                    **opts)
    assert not searched  # the bank came from the checkpoint
    assert resumed.manifest["trajectory_log"]["bank_search"]["cat"]["entries"] == log["bank_search"]["cat"]["entries"]
    assert full.state_dict.keys() == resumed.state_dict.keys()
    for k, v in full.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k
