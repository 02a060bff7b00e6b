"""TRCE (methods/trce.py, engines/trce.py, the closed-form engine's token classes) on tiny SD1.x / SDXL fixtures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from trace_erase import erase, get_adapter, load_erasure
from trace_erase.api import method_configs
from trace_erase.config import Concept
from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
from trace_erase.engines.pool import Pool, Trajectory
from trace_erase.engines.positions import class_positions
from trace_erase.engines.prompts import fill, load_corpus
from trace_erase.engines.stage_a import StageAWeights
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.engines.trce import hinge, trce_terms
from trace_erase.errors import TraceEraseError
from trace_erase.methods import METHODS, get_method
from trace_erase.models.base import TokenLayout
from trace_erase.models.loading import null_components

from .conftest import BUILDERS

TEMPLATES = ["{}", "a photo of {}"]
FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 1, "checkpoint_every": 1000,
        "trce_preserve_trajectories": 1, "trce_preserve_batch": 2, "templates": TEMPLATES}
CAT = [Concept("cat", anchor="dog")]
# the closed-form options added since (TRCE's, attribute contexts, neighbours), each off
NEW_CLOSED_FORM = {"token_weights": None, "mean_statistics": False, "attribute_contexts": False, "neighbours": 0,
                   "neighbour_vocab": "model", "neighbour_pool": 256, "neighbour_synonym": 0.5,
                   "neighbour_similarity": 0.8}


# ---- stage 2: the hinge ----------------------------------------------------------------------------------------------
def test_hinge_is_zero_past_the_margin_positive_otherwise_and_descends_towards_prefer() -> None:
    prefer, reject = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert hinge(prefer.clone(), prefer, reject, 1.0, 0.01).item() == 0.0  # at prefer: d_p − d_r = −1 < −margin
    assert hinge(reject.clone(), prefer, reject, 1.0, 0.01).item() == pytest.approx(1.01)  # at reject: 1 + margin
    # nearer prefer, but by less than the margin: d_p − d_r = (0.5 − δ)² − (0.5 + δ)² = −2δ
    near = torch.full_like(prefer, 0.5 - 0.002)
    assert hinge(near, prefer, reject, 2.0, 0.01).item() == pytest.approx(2.0 * (0.01 - 0.004), rel=1e-4)
    assert hinge(torch.full_like(prefer, 0.5 - 0.01), prefer, reject, 2.0, 0.01).item() == 0.0  # −0.02 < −0.01
    gen = torch.Generator().manual_seed(0)
    prefer, reject = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 4, 2, 2, generator=gen)
    pred = (0.3 * prefer + 0.7 * reject).requires_grad_(True)  # nearer reject: the hinge is active
    hinge(pred, prefer, reject, 1.0, 0.01).sum().backward()
    step = -pred.grad.flatten(1)
    cos = torch.nn.functional.cosine_similarity(step, (prefer - reject).flatten(1))
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)  # descent moves the prediction straight towards prefer
    moved = pred.detach() - 0.1 * pred.grad
    assert ((moved - prefer).norm() < (pred.detach() - prefer).norm()
            and (moved - reject).norm() > (pred.detach() - reject).norm())


def _stage_a(adapter) -> StageAWeights:
    cf = method_configs(get_method("trce"), {"templates": TEMPLATES})[0]
    return StageAWeights(adapter, ClosedFormEngine(adapter, cf, progress=False).run(CAT).deltas)


def _engine(name: str = "sd", stage_a: bool = True, **options) -> TrajectoryEngine:
    adapter = get_adapter(BUILDERS[name]())
    tr = method_configs(get_method("trce"), {k: v for k, v in {**FAST, **options}.items() if k != "templates"})[1]
    eng = TrajectoryEngine(adapter, tr, progress=False, stage_a=_stage_a(adapter) if stage_a else None)
    eng.concepts = CAT
    return eng


def _one_state_pool(adapter, t_concept: float = 901.0) -> Pool:
    gen = torch.Generator().manual_seed(1)
    x, xu = torch.randn(adapter.latent_shape(2), generator=gen)
    return Pool([Trajectory(x[None], torch.tensor([t_concept]), "a photo of cat"),
                 Trajectory(xu[None], torch.tensor([301.0]), "")])


def test_terms_are_the_concept_and_empty_prompt_hinges_against_the_original_model_plus_preservation() -> None:
    """Known answer on one state: prefer/reject from θ0 (stage A off), the trained model's concept and empty-prompt
    predictions each in the hinge, averaged, plus preserve_scale × the unconditional MSE against θ* (stage A on)."""
    eng = _engine(trce_margin=1.0, trce_preserve_batch=1)  # a large margin keeps both hinges active
    adapter, stage_a = eng.adapter, eng.stage_a
    pool = _one_state_pool(adapter)
    x, xu = pool.trajectories[0].states, pool.trajectories[1].states
    t, tu = torch.tensor([901.0]), torch.tensor([301.0])
    cond = adapter.conditioning
    eng.attach()
    try:
        with torch.no_grad():
            for p in eng.lora_parameters():
                p.add_(0.01)  # θ ≠ θ*: the preservation term is not 0
        with stage_a.applied(), torch.no_grad():
            terms = trce_terms(eng, pool)
            stage_a.set(False)
            with eng.stage_a_model():
                r_c, r_s, r_u = (adapter.predict(x, t, cond([p])) for p in ("a photo of cat", "a photo of dog", ""))
            stage_a.set(True)
            with eng.stage_a_model():
                s_c, s_s, s_u = (adapter.predict(x, t, cond([p])) for p in ("a photo of cat", "a photo of dog", ""))
                kept = adapter.predict(xu, tu, cond([""]))
            e_c, e_u, e_p = adapter.predict(x, t, cond(["a photo of cat"])), adapter.predict(x, t, cond([""])), \
                adapter.predict(xu, tu, cond([""]))
    finally:
        eng.detach()
    g, margin = 15.0, 1.0
    prefer, reject = r_s + g * (r_s - r_u), r_c + g * (r_c - r_u)
    h_c, h_u = hinge(e_c, prefer, reject, 1.0, margin), hinge(e_u, prefer, reject, 1.0, margin)
    pres = (e_p - kept).pow(2).mean()
    assert h_c.item() > 0 and h_u.item() > 0 and pres.item() > 0
    assert terms["hinge"].item() == pytest.approx(h_c.item(), rel=1e-5)
    assert terms["hinge_uncond"].item() == pytest.approx(h_u.item(), rel=1e-5)  # the EMPTY prompt's prediction
    assert terms["trce_pres"].item() == pytest.approx(pres.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((0.5 * (h_c + h_u) + 100.0 * pres).item(), rel=1e-5)
    # the references are the original model's: the stage-A model's give another value
    stage_a_ref = hinge(e_c, s_s + g * (s_s - s_u), s_c + g * (s_c - s_u), 1.0, margin)
    assert abs(stage_a_ref.item() - h_c.item()) > 1e-4 * h_c.item()


def test_sequential_branches_give_the_batched_gradients() -> None:
    grads = {}
    for mode in ("batched", "sequential"):
        eng = _engine(branches=mode, trce_margin=1.0)
        pool = _one_state_pool(eng.adapter)
        eng.attach()
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                for p in eng.lora_parameters():
                    p.normal_(0, 0.01)
            for p in eng.lora_parameters():
                p.requires_grad_(True)
            with eng.stage_a.applied():
                trce_terms(eng, pool, backward_scale=1.0)
            grads[mode] = torch.cat([p.grad.flatten() for p in eng.lora_parameters()])
        finally:
            eng.detach()
    assert grads["batched"].abs().max() > 0
    assert torch.allclose(grads["batched"], grads["sequential"], rtol=1e-4, atol=1e-8)


def test_hinge_states_come_only_from_the_early_window() -> None:
    """TRCE's default window holds the first 26 of 50 sampler steps (its max_early_timestep 25): 13 of our 25. Its
    hinge samples only those; preservation samples unconditional trajectories at any step."""
    eng = _engine(stage_a=False, rollout_steps=8, trce_preserve_batch=4)
    adapter, cfg = eng.adapter, eng.config
    for steps, early in ((50, 26), (25, 13)):
        times = adapter.model_time(adapter.rollout_scheduler(steps).timesteps.float())
        assert int((~adapter.is_late(times, cfg.tau)).sum()) == early
    pool = Pool()
    eng.fill_pool(pool, CAT)
    assert len(pool) == 2 and pool.prompts.count("") == 1  # a concept trajectory and an unconditional one
    before = list(pool.trajectories)
    eng.refresh(pool, CAT)  # replaces the oldest of each kind
    assert len(pool) == 2 and pool.prompts.count("") == 1 and not set(map(id, before)) & set(map(id, pool.trajectories))
    calls = []
    sample = eng.sample

    def spy(pool, rows=None, any_time=False, n=None):
        out = sample(pool, rows, any_time, n)
        calls.append(({pool.prompts[j] for j in rows}, out[1]))
        return out

    eng.sample = spy
    with torch.no_grad():
        for _ in range(12):
            trce_terms(eng, pool)
    threshold = cfg.tau * adapter.time_scale
    concept_times = torch.cat([t for prompts, t in calls if "" not in prompts])
    uncond_times = torch.cat([t for prompts, t in calls if prompts == {""}])
    assert len(concept_times) == 12 and (concept_times >= threshold).all()
    assert (uncond_times < threshold).any() and (uncond_times >= threshold).any()  # any step
    all_times = pool.trajectories[0].times
    assert set(concept_times.tolist()) <= set(all_times[all_times >= threshold].tolist())


def test_window_early_and_trce_settings_are_checked() -> None:
    with pytest.raises(TraceEraseError, match="window=early samples only EARLY states"):
        TrajectoryConfig.from_options(window="early")
    base = {"window": "early", "trce_beta": 1.0, "beta": 0.0, "gamma": 0.0, "early_mode": "none"}
    assert TrajectoryConfig.from_options(base).trce.beta == 1.0
    with pytest.raises(TraceEraseError, match="set window=early"):
        TrajectoryConfig.from_options({**base, "window": "two"})
    with pytest.raises(TraceEraseError, match="switch off gamma"):
        TrajectoryConfig.from_options({**base, "gamma": 0.5})
    with pytest.raises(TraceEraseError, match="trce_margin must be ≥ 0"):
        TrajectoryConfig.from_options({**base, "trce_margin": -1.0})
    on = TrajectoryConfig.from_options(base)
    assert TrajectoryConfig.from_options(on.options()) == on  # options() reads back
    off = TrajectoryConfig.from_options({})
    assert off.trce is None and not any(k.startswith("trce_") for k in off.options())


# ---- layers ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_only_image_side_layers_get_the_lora_at_full_rank(name: str) -> None:
    eng = _engine(name, stage_a=False)
    assert eng.targets and all(t.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                           "attn2.to_q")) for t in eng.targets)
    assert any(t.endswith("attn1.to_out.0") for t in eng.targets) and any(t.endswith("attn2.to_q") for t in eng.targets)
    eng.attach()
    try:
        trained = {n for n, p in eng.adapter.denoiser.named_parameters() if "lora_" in n}
        assert trained and not any(".attn2.to_k." in n or ".attn2.to_v." in n or ".attn2.to_out." in n
                                   for n in trained)
        for t in eng.targets:
            layer = eng.adapter.denoiser.get_submodule(t)
            a = layer.lora_A["trace_erase_train"].weight
            assert a.shape[0] == min(layer.in_features, layer.out_features)  # rank 0: each layer's full rank
            assert layer.scaling["trace_erase_train"] == 1.0  # α = r
    finally:
        eng.detach()


# ---- stage 1: TRCE's token classes -----------------------------------------------------------------------------------
def test_class_positions_map_start_end_and_key_tokens() -> None:
    lt = TokenLayout(start=3, end=5, length=7, max_length=10)
    la = TokenLayout(start=3, end=4, length=6, max_length=10)
    t, a, w = class_positions(lt, la, (1.0, 2.0, 3.0, 4.0))
    assert list(zip(t, a, w, strict=True)) == [(0, 0, 1.0), (6, 5, 2.0), (9, 9, 9.0), (3, 9, 4.0), (4, 9, 4.0)]
    t, a, w = class_positions(lt, la, (0.0, 1.0, 0.0, 0.0))
    assert (t, a, w) == ([6], [5], [1.0])


def _stats(adapter, weights, corpus=None):
    cfg = ClosedFormConfig(token_selection="trce", token_weights=list(weights), templates=TEMPLATES,
                           mean_statistics=True, preserve_corpus=corpus, probe_prompts=[])
    return ClosedFormEngine(adapter, cfg, progress=False).statistics(CAT)["tokens"]


def test_token_weights_reach_the_gram_and_a_zero_weight_removes_a_class() -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    full = _stats(adapter, (1, 1, 1, 1))
    parts = [_stats(adapter, [float(i == k) for i in range(4)]) for k in range(4)]
    for part in parts:
        assert part.g_e.abs().max() > 1e-6  # every class contributes
    torch.testing.assert_close(sum(p.g_e for p in parts), full.g_e)
    torch.testing.assert_close(sum(p.c for p in parts), full.c)
    no_start = _stats(adapter, (0, 1, 1, 1))
    torch.testing.assert_close(no_start.g_e, full.g_e - parts[0].g_e)  # weight 0: the start rows are gone
    doubled = _stats(adapter, (0, 2, 0, 0))
    torch.testing.assert_close(doubled.g_e, 2 * parts[1].g_e)
    # known answer: the first end tokens' Gram, mean over the prompt pairs; the last position × its padding run
    first, last = torch.zeros_like(full.g_e), torch.zeros_like(full.g_e)
    cross = torch.zeros_like(full.c)
    for tpl in TEMPLATES:
        (pt, st), (pa, sa) = fill(tpl, "cat"), fill(tpl, "dog")
        lt, la = adapter.token_layout(pt, st), adapter.token_layout(pa, sa)
        ft, fa = (adapter.encode_text([p])["tokens"][0].double() for p in (pt, pa))
        e, anc = ft[lt.length - 1], fa[la.length - 1]
        first += torch.outer(e, e) / len(TEMPLATES)
        cross += torch.outer(e, anc) / len(TEMPLATES)
        last += (lt.max_length - lt.length) * torch.outer(ft[-1], ft[-1]) / len(TEMPLATES)
    torch.testing.assert_close(parts[1].g_e, first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[1].c, cross, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[2].g_e, last, rtol=1e-5, atol=1e-6)


def test_mean_statistics_average_the_preserved_captions_and_lambda_zero_solves() -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    st = _stats(adapter, (0, 1, 0, 0), corpus="builtin")
    captions = load_corpus(adapter, "builtin", CAT)
    feats = adapter.encode_text(captions)["tokens"].double().flatten(0, 1)
    torch.testing.assert_close(st.g_p, feats.T @ feats / len(captions), rtol=1e-5, atol=1e-6)
    cf = method_configs(get_method("trce"), {"templates": TEMPLATES})[0]
    assert cf.lambda_reg == 0.0 and cf.mean_statistics
    result = ClosedFormEngine(adapter, cf, progress=False).run(CAT)
    assert all(torch.isfinite(d).all() for d in result.deltas.values())
    cert = result.certificate.values()
    assert max(c["erasure_residual"] for c in cert) < 0.1 * min(c["erasure_residual_before"] for c in cert)
    with pytest.raises(TraceEraseError, match="lambda_reg=0 needs a preserve_corpus"):
        ClosedFormConfig(lambda_reg=0.0)
    with pytest.raises(TraceEraseError, match="set token_selection=trce"):
        ClosedFormConfig(token_weights=[0.0, 1.0, 0.0, 0.0])


# ---- the method ------------------------------------------------------------------------------------------------------
def test_trce_runs_end_to_end_and_loads_in_plain_diffusers(tmp_path, saved_models) -> None:
    pipe = DiffusionPipeline.from_pretrained(saved_models["sd"], **null_components(saved_models["sd"]))
    er = erase(pipe, ["cat"], method="trce", anchor="dog", progress=False, **FAST)
    er.save(tmp_path / "e")
    assert not pipe.get_list_adapters()
    m = load_erasure(tmp_path / "e").manifest
    assert m["method"] == "trce" and "certificate" in m and m["trajectory_log"]["steps"] == 2
    losses = m["trajectory_log"]["final_losses"]
    assert {"hinge", "hinge_uncond", "trce_pres"} <= set(losses) and losses["erase"] == 0.0
    stage_1 = [t for t in m["lora"]["target_modules"] if t.endswith(("attn2.to_k", "attn2.to_v"))]
    stage_2 = [t for t in m["lora"]["target_modules"] if t not in stage_1]
    assert stage_1 and stage_2 and all(".attn1." in t or t.endswith("attn2.to_q") for t in stage_2)
    fresh = DiffusionPipeline.from_pretrained(saved_models["sd"], **null_components(saved_models["sd"]))
    fresh.load_lora_weights(str(tmp_path / "e"))
    x = torch.randn(get_adapter(fresh).latent_shape(1), generator=torch.Generator().manual_seed(0))
    a = get_adapter(fresh)
    assert torch.isfinite(a.predict(x, torch.tensor([500]), a.conditioning(["a photo of a cat"]))).all()


def test_trce_runs_on_sdxl_and_refuses_flux_and_sd3() -> None:
    er = erase(BUILDERS["sdxl"](), ["cat"], method="trce", anchor="dog", progress=False, **FAST)
    assert er.manifest["method"] == "trce"
    for family in ("flux", "sd3"):
        with pytest.raises(TraceEraseError, match=f"does not support {family}"):
            get_method("trce").check_family(family)


def test_existing_methods_configs_are_unchanged() -> None:
    """Every method registered before TRCE builds the configs it built then (tests/data holds them): the same
    trajectory options (TRCE's keys are not written while it is off) and closed-form options, TRCE's off."""
    before = json.loads((Path(__file__).parent / "data" / "method_configs_before_trce.json").read_text())
    assert set(before) == set(METHODS) - {"trce", "advunlearn"}  # the methods registered since
    for name, want in before.items():
        spec = METHODS[name]
        cf, tr = method_configs(spec, {})
        got = dataclasses.asdict(cf) if cf else None
        if got is not None:
            assert {k: got.pop(k) for k in NEW_CLOSED_FORM} == NEW_CLOSED_FORM, name
            # what a stage-B checkpoint's hash covers is exactly what it was, so interrupted runs still resume
            assert cf.run_settings() == want["closed_form"], name
        assert got == want["closed_form"], name
        assert json.loads(json.dumps(tr.options() if tr else None)) == want["trajectory"], name
        if spec.uses_trajectory:
            several = method_configs(spec, {"multi": spec.multi_default})[1].options()
            assert json.loads(json.dumps(several)) == want["trajectory_several"], name
