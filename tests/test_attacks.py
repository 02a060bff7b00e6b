"""The attack harness: configs and bad input, the injection mechanics (word slots, conditioning embeds, training
pairs) on tiny real-class pipelines, the known answer (the conditioning level inverts a closed-form erasure), every
attack for a few steps on tiny SD and FLUX, and sanity / determinism / scale-0 / specificity on the bundled toy-sd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trace_erase import erase, load_model
from trace_erase.attacks import AttackConfig, run_attack
from trace_erase.attacks.continuous import simplex_projection, soft_prompt
from trace_erase.attacks.discrete import genetic_search, nearest_tokens, projected
from trace_erase.attacks.prompts import HELD_OUT_TEMPLATES, held_out_ok, paraphrase_families
from trace_erase.attacks.reference import base_reference
from trace_erase.errors import NonFiniteLossError, TraceEraseError
from trace_erase.models import ModelHandle, get_adapter
from trace_erase.models.injection import WordSlots, decode_tokens, embeds_for, typable_ids
from trace_erase.sampling import generate_images

from .conftest import BUILDERS, run_cli


def tiny_handle(name: str) -> ModelHandle:
    pipe = BUILDERS[name]()
    return ModelHandle(pipe=pipe, adapter=get_adapter(pipe), source=name, defaults={"steps": 3, "guidance": 3.0})


# ---- configs and bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"attack": "bogus"}, "unknown --attack 'bogus'"),
    ({"attack": "soft-prompt", "budget": 0}, "--budget must be at least 1"),
    ({"attack": "soft-prompt", "budget": -3}, "--budget must be at least 1"),
    ({"attack": "inversion", "level": "token"}, "acts at the word level"),
    ({"attack": "soft-prompt", "level": "weird"}, "unknown --level 'weird'"),
    ({"attack": "concept-vector", "etas": (1.0, -2.0)}, "--etas must be positive"),
    ({"attack": "soft-prompt", "prompts": "x.csv"}, "--prompts applies to --attack paraphrase"),
    ({"attack": "soft-prompt", "seeds": 0}, "--seeds must be at least 1"),
    ({"attack": "ring-a-bell", "etas": (1.0, 3.0)}, "pass one value to --etas"),
    ({"attack": "soft-prompt", "etas": (1.0,)}, "--etas applies to --attack concept-vector and ring-a-bell"),
    ({"attack": "ring-a-bell", "population": 1}, "--population must be at least 2"),
    ({"attack": "p4d", "level": "word"}, "acts at the token level"),
    ({"attack": "p4d", "trajectories": 2}, "set trajectories to 3 or more"),
])
def test_config_refuses_bad_input_in_one_line(kwargs, message):
    with pytest.raises(TraceEraseError, match=message) as exc:
        AttackConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_cli_bad_input_exits_2_with_one_line_before_loading(tmp_path):
    for args, message in ((["--attack", "unknown", "--concept", "circle"], "unknown --attack"),
                          (["--attack", "soft-prompt", "--concept", "dog"], "'dog' is not a class"),
                          (["--attack", "soft-prompt", "--budget", "0", "--concept", "circle"], "--budget")):
        res = run_cli(["attack", "--model", "toy-sd", "--output", str(tmp_path / "out"), *args])
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], res.stderr
        assert not (tmp_path / "out").exists()


def test_budget_points_end_at_the_budget():
    assert AttackConfig("soft-prompt", budget=200, checkpoints=4).budget_points() == [50, 100, 150, 200]
    assert AttackConfig("inversion", budget=2, checkpoints=5).budget_points() == [1, 2]


def test_held_out_templates_are_unseen_by_captions_and_stage_a():
    assert held_out_ok() == []
    fam = paraphrase_families("circle", budget=100)
    assert len(fam["held-out"]) == len(HELD_OUT_TEMPLATES)
    assert all("circle" not in p and "disc" not in p for p in fam["descriptions"])
    assert all(len(v) <= 2 for v in paraphrase_families("circle", budget=2).values())


def test_simplex_projection_known_answers():
    z = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.6, 0.6, -1.0]])
    p = simplex_projection(z)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    assert torch.allclose(p, expected, atol=1e-6)


# ---- injection mechanics on tiny pipelines --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_word_slots_change_only_the_slots_and_leave_other_prompts_alone(name):
    handle = tiny_handle(name)
    adapter = handle.adapter
    slots = WordSlots(adapter, 2, ["a photo of a cat"])
    prompt = slots.prefixed("a photo of a cat")
    plain = adapter.conditioning([prompt, ""])
    # the filler's own embedding in the slots: nothing changes
    with slots.active(slots.init_from(slots.filler)):
        same = adapter.conditioning([prompt, ""])
    for k, v in plain.tensors.items():
        assert torch.allclose(v, same.tensors[k], atol=1e-6), k
    moved = [torch.randn_like(v) for v in slots.init_from(slots.filler)]
    with slots.active(moved):
        other = adapter.conditioning([prompt, ""])
    ehs = "encoder_hidden_states"
    assert not torch.allclose(other.tensors[ehs][0], plain.tensors[ehs][0])
    assert torch.allclose(other.tensors[ehs][1], plain.tensors[ehs][1])  # the negative prompt has no slots
    if name == "sd":  # CLIP is causal: the BOS position before the slots is untouched
        assert torch.allclose(other.tensors[ehs][0, 0], plain.tensors[ehs][0, 0])
    # outside the context the hooks are gone
    after = adapter.conditioning([prompt])
    assert torch.allclose(after.tensors[ehs][0], plain.tensors[ehs][0])


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_one_lr_moves_every_encoders_slots_in_proportion_to_its_embedding_table(name):
    """FLUX's T5 table is ~50x its CLIP's: an lr set for CLIP must step T5's slots 50x further, and AdamW's decay must
    still shrink every slot by lr * weight_decay per step."""
    slots = WordSlots(tiny_handle(name).adapter, 2, [])
    rms = [float(t.float().pow(2).mean().sqrt()) for t in slots.tables()]
    if name == "flux":
        assert rms[1] / rms[0] > 10  # the case the scaling is for
    values = [v.clone().requires_grad_(True) for v in slots.init_from(slots.filler)]
    start = [v.detach().clone() for v in values]
    opt = torch.optim.Adam(slots.param_groups(values, 1e-3))
    sum(v.sum() for v in values).backward()  # a unit gradient: Adam's first step is lr in every coordinate
    opt.step()
    for v, s, r in zip(values, start, rms, strict=True):
        assert float((s - v.detach()).mean()) == pytest.approx(1e-3 * r / rms[0], rel=1e-3)
    start = [v.detach().clone() for v in values]
    opt = torch.optim.AdamW(slots.param_groups(values, 1e-2, 0.1))
    for v in values:
        v.grad = torch.zeros_like(v)  # no gradient: only the decay moves the slots
    opt.step()
    for v, s in zip(values, start, strict=True):
        assert torch.allclose(v.detach(), s * (1 - 1e-2 * 0.1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["sd", "flux", "sdxl", "sd3"])
def test_generating_from_conditioning_embeds_equals_generating_from_the_prompt(name):
    handle = tiny_handle(name)
    adapter = handle.adapter
    prompt = "a photo of a cat"
    with torch.no_grad():
        table = {prompt: adapter.conditioning([prompt])}
        uncond = adapter.conditioning([""])
    a = generate_images(handle, [prompt, prompt], [0, 1], progress=False, output_type="np")
    b = generate_images(handle, [prompt, prompt], [0, 1], progress=False, output_type="np",
                        embeds=embeds_for(adapter, table, uncond))
    assert np.allclose(np.stack(a), np.stack(b), atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sd2v", "flux"])
def test_training_pair_matches_the_schedulers_noising(name):
    handle = tiny_handle(name)
    adapter = handle.adapter
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    u = torch.tensor([0.1, 0.5, 0.9])
    x_t, t, target = adapter.training_pair(x0, noise, u)
    if adapter.time_kind == "flow":
        assert torch.allclose(t, u)
        assert torch.allclose(x_t, (1 - u.view(-1, 1, 1, 1)) * x0 + u.view(-1, 1, 1, 1) * noise)
        assert torch.allclose(target, noise - x0)
        return
    sched = handle.pipe.scheduler
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(sched.config)
    assert torch.allclose(x_t, ddpm.add_noise(x0, noise, t), atol=1e-6)
    want = noise if adapter.prediction_type == "epsilon" else ddpm.get_velocity(x0, noise, t)
    assert torch.allclose(target, want, atol=1e-6)


def test_conditioning_level_inverts_a_closed_form_erasure_on_the_tiny_fixture():
    """§1.4's known answer: W' = W·S with S invertible, so some conditioning c' makes the erased model predict what
    the base model predicts for c. The attack must find it (and a word-level slot of the same budget need not)."""
    handle = tiny_handle("sd")
    torch.manual_seed(0)
    er = erase(handle, ["cat"], anchor="dog", method="trace-closed-form", progress=False)
    prompts = ["a photo of a cat"]
    ref = base_reference(handle, prompts, trajectories=2, seed=0)
    er.apply(handle)
    cfg = AttackConfig("soft-prompt", level="conditioning", budget=300, lr=5e-2, checkpoints=1)
    found = {}
    soft_prompt(handle, cfg, "cat", ref, lambda b, cand: found.update(cand=cand), progress=False)
    cand = found["cand"]
    adapter = handle.adapter
    with torch.no_grad():
        c_plain = adapter.conditioning(prompts).repeat(len(ref.states))
        c_adv = cand.embeds(prompts)  # the pipeline arguments: prompt_embeds is the attacked conditioning
        from trace_erase.models.base import Conditioning

        c_att = Conditioning({"encoder_hidden_states": c_adv["prompt_embeds"]}).repeat(len(ref.states))
        gap_plain = (adapter.predict(ref.states, ref.times, c_plain) - ref.base_pred).norm()
        gap_att = (adapter.predict(ref.states, ref.times, c_att) - ref.base_pred).norm()
    assert gap_plain > 1e-3 * ref.base_pred.norm()  # the erasure moved the predictions (a little: random text path)
    assert gap_att < 0.1 * gap_plain  # the conditioning-level attack undoes (almost all of) it


# ---- every attack runs on tiny SD and FLUX -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "flux"])
@pytest.mark.parametrize("attack, kwargs", [
    ("paraphrase", {"budget": 1}),
    ("concept-vector", {"budget": 2, "etas": (1.0, 3.0)}),
    ("soft-prompt", {"budget": 2}),
    ("soft-prompt", {"budget": 2, "level": "conditioning"}),
    ("inversion", {"budget": 2}),
    ("unlearndiff", {"budget": 2}),
    ("ring-a-bell", {"budget": 2, "population": 4, "tokens": 3}),
    ("p4d", {"budget": 2, "tokens": 3, "trajectories": 3}),
])
def test_each_attack_runs_a_few_steps_on_tiny_fixtures(name, attack, kwargs, tmp_path):
    handle = tiny_handle(name)
    er = erase(handle, ["circle"], anchor="", method="trace-closed-form", progress=False)
    cfg = AttackConfig(attack, **{"seeds": 1, "batch": 2, "trajectories": 2, "checkpoints": 2, **kwargs})
    res = run_attack(handle, er, cfg, "circle", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "results.json").is_file()
    assert res["erased"]["checkpoints"] and res["base"]["checkpoints"]
    assert res["settings"]["attack"]["level"] == cfg.the_level
    assert all(isinstance(c["success"], bool) for c in res["erased"]["checkpoints"][-1]["cases"])
    assert not handle.pipe.get_list_adapters() or not any(handle.pipe.get_list_adapters().values())


class _NanBackward(torch.autograd.Function):
    """The identity forward, NaN gradients backward: an attention kernel's bf16 backward bug, on the CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_nonfinite_gradients_under_a_finite_loss_stop_the_attack_before_its_step(monkeypatch, tmp_path):
    """Refused at the step it happens, naming the fix; applied, the NaN would come back a step later as a NaN loss
    with the wrong advice (lower --lr)."""
    import trace_erase.attacks.continuous as methods

    handle = tiny_handle("sd")
    original = methods.match_base_loss
    monkeypatch.setattr(methods, "match_base_loss", lambda *a, **k: _NanBackward.apply(original(*a, **k)))
    cfg = AttackConfig("soft-prompt", seeds=1, batch=2, trajectories=2, checkpoints=2, budget=3)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 1 with a finite loss.*--dtype fp32"):
        run_attack(handle, None, cfg, "circle", tmp_path / "out", progress=False)


def test_genetic_search_finds_a_known_sequence_and_never_loses_its_best():
    target = torch.tensor([3, 7, 1, 9, 4])
    fitness = lambda pop: (pop != target).sum(1).float()  # noqa: E731 — Hamming distance to the answer
    history = []
    best, fit = genetic_search(fitness, 12, 5, 40, 80, torch.Generator().manual_seed(0),
                               lambda g, b, f: history.append(f))
    assert fit == 0 and torch.equal(best, target)
    assert all(b <= a for a, b in zip(history, history[1:], strict=False))  # the better half survives
    assert history[0] > 0  # it was not found by the random start alone


def test_pez_projection_forwards_the_nearest_token_and_trains_the_free_vector():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    free = torch.tensor([[0.9, 0.2], [-0.1, -3.0], [0.2, 0.5]], requires_grad=True)
    embeds, idx = projected(free, table)
    assert idx.tolist() == [0, 2, 1]  # by cosine, not by distance ([-0.1, -3] is nearest [0, 1]'s opposite)
    assert torch.equal(nearest_tokens(free.detach(), table), idx)
    assert torch.equal(embeds.detach(), table[idx])
    (embeds * torch.tensor([[1.0, 2.0]])).sum().backward()
    assert torch.equal(free.grad, torch.tensor([[1.0, 2.0]] * 3))  # straight through to the free vectors


def test_ring_a_bell_searches_once_with_typable_tokens_and_approaches_its_target():
    handle = tiny_handle("sd")
    er = erase(handle, ["circle"], anchor="", method="trace-closed-form", progress=False)
    cfg = AttackConfig("ring-a-bell", budget=6, population=8, tokens=4, seeds=1, checkpoints=2)
    res = run_attack(handle, er, cfg, "circle", progress=False)
    first, last = res["erased"]["checkpoints"]
    assert all(b <= a for a, b in zip(first["detail"]["fitness"], last["detail"]["fitness"], strict=True))
    assert last["detail"]["tokens"] == res["base"]["checkpoints"][-1]["detail"]["tokens"]  # one search, both models
    typable = set(typable_ids(handle.adapter.token_tokenizer))
    assert all(t in typable for seq in last["detail"]["tokens"] for t in seq)
    assert [c["prompt"] for c in last["cases"]] == [
        decode_tokens(handle.adapter.token_tokenizer, seq) for seq in last["detail"]["tokens"]]
    again = run_attack(handle, er, cfg, "circle", progress=False)
    assert again["erased"]["checkpoints"][-1]["detail"] == last["detail"]


def test_a_run_with_a_control_reuses_its_base_model_reference_and_gets_the_same_result(monkeypatch):
    handle = tiny_handle("sd")
    er = erase(handle, ["circle"], anchor="", method="trace-closed-form", progress=False)
    cfg = AttackConfig("soft-prompt", budget=2, seeds=1, batch=2, trajectories=2, checkpoints=1)
    alone = run_attack(handle, er, cfg, "circle", progress=False)
    control = run_attack(handle, None, cfg, "circle", progress=False)

    def no_second_reference(*args, **kwargs):
        raise AssertionError("the base-model reference was computed again")

    monkeypatch.setattr("trace_erase.attacks.registry.base_reference", no_second_reference)
    reused = run_attack(handle, er, cfg, "circle", progress=False, control=control)
    assert reused["erased"]["checkpoints"] == alone["erased"]["checkpoints"]


# ---- on the bundled toy-sd -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    handle = load_model("toy-sd")
    torch.manual_seed(0)
    return handle, erase(handle, ["circle"], method="uce", progress=False)


def test_same_seeds_same_results(toy):
    handle, er = toy
    cfg = AttackConfig("soft-prompt", budget=4, seeds=1, checkpoints=1, trajectories=2)
    a = run_attack(handle, er, cfg, "circle", progress=False)
    b = run_attack(handle, er, cfg, "circle", progress=False)
    assert a["erased"]["checkpoints"] == b["erased"]["checkpoints"]
    assert a["base"]["checkpoints"] == b["base"]["checkpoints"]


def test_scale_zero_gives_the_base_rates(toy):
    handle, er = toy
    res = run_attack(handle, er, AttackConfig("paraphrase", budget=1, seeds=2), "circle", scale=0.0, progress=False)
    assert res["pre_asr"] == res["base_rate"] and res["asr"] == res["base_asr"]
    full = run_attack(handle, er, AttackConfig("paraphrase", budget=1, seeds=2), "circle", progress=False,
                      control=res)  # the same base-model side: reused
    assert full["pre_asr"] < full["base_rate"]  # at full strength the erasure does act


def test_on_the_unerased_model_the_attack_does_not_lower_the_rate(toy):
    handle, _ = toy
    res = run_attack(handle, None, AttackConfig("unlearndiff", budget=4, seeds=3, checkpoints=1), "circle",
                     progress=False)
    assert res["base_asr"] >= res["base_rate"] - 1e-9


def test_an_attack_for_one_class_does_not_raise_another_erased_class(toy):
    """Specificity: the soft prompt learned to recover 'circle' through a 'circle' erasure, put in front of 'square'
    prompts on a model where square is erased, does not bring squares back beyond that model's no-attack rate."""
    handle, er_circle = toy
    er_square = erase(handle, ["square"], method="uce", progress=False)
    from trace_erase.artifacts.erasure import remove_erasures
    from trace_erase.attacks.prompts import eval_prompts
    from trace_erase.attacks.run import _rate, _Scoring, attack_suite
    from trace_erase.evaluation.scorers import scorer_for

    remove_erasures(handle.pipe)
    cfg = AttackConfig("soft-prompt", budget=30, seeds=4, checkpoints=1)
    ref = base_reference(handle, eval_prompts("circle"), cfg.trajectories, cfg.seed)
    er_circle.apply(handle)
    found = {}
    soft_prompt(handle, cfg, "circle", ref, lambda b, cand: found.update(cand=cand), progress=False)
    cand = found["cand"]
    er_square.apply(handle)
    suite, label = attack_suite("square")
    scoring = _Scoring(handle, scorer_for(suite, None), suite, label, cfg.seeds)
    plain = eval_prompts("square")
    pre, _ = scoring(type(cand)(plain, plain))
    attacked, _ = scoring(type(cand)([cand.slots.prefixed(p) for p in plain], plain, slots=cand.slots,
                                     values=cand.values))
    remove_erasures(handle.pipe)
    assert _rate(attacked) <= _rate(pre) + 1 / len(pre)


def test_bench_attacks_adds_asr_columns_with_one_control_per_concept(toy, tmp_path):
    from trace_erase.benchmark.bench import run_bench
    from trace_erase.benchmark.tables import markdown

    handle, _ = toy
    cfg = AttackConfig("paraphrase", budget=1, seeds=1)
    res = run_bench(handle, ["uce"], ["circle"], tmp_path / "b", seeds=1, progress=False, attacks=[cfg])
    rows = {r["method"]: r for r in res["rows"]}
    control = __import__("json").loads((tmp_path / "b" / "attacks" / "circle" / "paraphrase" / "results.json")
                                       .read_text())
    assert rows["base"]["asr_paraphrase"] == control["base_asr"]
    run = __import__("json").loads((tmp_path / "b" / "runs" / "circle" / "uce" / "attacks" / "paraphrase" /
                                    "results.json").read_text())
    assert rows["uce"]["asr_paraphrase"] == run["asr"] and run["base_asr"] == control["base_asr"]
    assert "ASR paraphrase" in markdown(res)


def test_paraphrase_reads_a_prompt_file_and_needs_one_beyond_the_toy_world(tmp_path):
    from trace_erase.attacks.prompts import file_families
    from trace_erase.attacks.run import check_attack

    path = tmp_path / "p.csv"
    path.write_text("prompt\na church at dusk\nan old chapel\na cathedral\n")
    assert file_families(str(path), 2) == {"file": ["a church at dusk", "an old chapel"]}
    with pytest.raises(TraceEraseError, match="pass --prompts FILE"):
        check_attack(AttackConfig("paraphrase"), "church")
    check_attack(AttackConfig("paraphrase", prompts=str(path)), "church")
    check_attack(AttackConfig("paraphrase"), "circle")
