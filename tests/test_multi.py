"""Several concepts: closed-form fusion of per-concept LoRAs (exact, and equal to the dense solve), its fallbacks,
per-concept scales, resume between concepts, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trace_erase import TraceEraseError, erase, get_adapter, load_erasure
from trace_erase.artifacts.lora import lora_to_delta
from trace_erase.cli import main
from trace_erase.engines.fusion import FusionInputs, certificate, concept_scaled, fuse

from .conftest import BUILDERS
from .test_closed_form import _pred

FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 1, "checkpoint_every": 1000}
FAST_A = {"templates": ["{}", "a photo of {}"], "preserve_corpus": None, "preserve": ["boat"]}


def _synthetic(q: int, d: int = 6, out: int = 5, r: int = 2, rows: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    e = [rand(rows, d) for _ in range(q)]
    p = rand(rows, d)
    factors = [{"m": (rand(r, d), rand(out, r))} for _ in range(q)]
    inputs = FusionInputs(factors, {"m": "s"}, [{"s": x.T @ x} for x in e], {"s": p.T @ p})
    return inputs, e, p, rand(out, d)


def _dense(fused):
    a, b = fused["m"]
    return b @ a


def test_fusion_identity_one_concept_no_regularisation() -> None:
    """q = 1, λ = λ_p = 0, full-rank token Gram: W*E = (W + ΔW)E exactly."""
    inputs, e, _, w = _synthetic(1)
    fused, how, _ = fuse(inputs, lam=0.0, lam_preserve=0.0)
    a, b = inputs.factors[0]["m"]
    assert how == {"m": "closed-form"}
    assert torch.allclose((w + _dense(fused)) @ e[0].T, (w + b @ a) @ e[0].T, atol=1e-10)


def test_fused_lora_equals_the_dense_least_squares_solution() -> None:
    """The rank-Σr LoRA equals W* solved directly from the stacked rows of the objective (to 1e-5)."""
    inputs, e, p, w = _synthetic(3)
    lam, lam_p = 0.3, 0.7
    fused, _, slices = fuse(inputs, lam, lam_p)
    assert fused["m"][0].shape[0] == 6 and slices == [(0, 2), (2, 4), (4, 6)]  # rank Σ rᵢ
    xs = [*e, lam_p ** 0.5 * p, lam ** 0.5 * torch.eye(6, dtype=torch.float64)]
    targets = [x @ (w + f["m"][1] @ f["m"][0]).T for x, f in zip(e, inputs.factors, strict=True)]
    targets += [lam_p ** 0.5 * p @ w.T, lam ** 0.5 * w.T]
    w_star = torch.linalg.lstsq(torch.cat(xs), torch.cat(targets)).solution.T
    assert torch.allclose(w + _dense(fused), w_star, atol=1e-5)


def test_fusion_reproduces_each_concept_better_than_a_naive_sum() -> None:
    inputs, _, _, w = _synthetic(3)
    fused, _, _ = fuse(inputs, 0.1, 1.0)
    for cert in certificate(inputs, fused, {"m": w}):
        assert cert["reproduction_error"] < cert["naive_sum_reproduction_error"]
    summed, how, _ = fuse(inputs, 0.1, 1.0, mode="sum")
    assert how == {"m": "sum"}
    assert torch.allclose(_dense(summed), sum(f["m"][1] @ f["m"][0] for f in inputs.factors))


def test_scale_zero_drops_the_concept_and_other_scales_are_linear() -> None:
    inputs, _, _, _ = _synthetic(3)
    without = FusionInputs(inputs.factors[:2], inputs.module_stream, inputs.grams[:2], inputs.preserve)
    dropped, _, slices = fuse(inputs, 0.1, 1.0, scales=[1.0, 1.0, 0.0])
    assert torch.allclose(_dense(dropped), _dense(fuse(without, 0.1, 1.0)[0]), atol=1e-12)
    assert slices[2] == (4, 4)
    half, _, _ = fuse(inputs, 0.1, 1.0, scales=[1.0, 0.5, 1.0])
    full, _, _ = fuse(inputs, 0.1, 1.0)
    a, b = full["m"]
    expected = b[:, :2] @ a[:2] + 0.5 * b[:, 2:4] @ a[2:4] + b[:, 4:] @ a[4:]
    assert torch.allclose(_dense(half), expected, atol=1e-12)


def test_modules_that_do_not_read_text_are_summed_and_recorded() -> None:
    """FLUX's stage B sits on add_k/add_v, whose inputs are modulated per block: no token Gram, so a sum."""
    pipe = BUILDERS["flux"]()
    er = erase(pipe, ["cat", "dog"], method="trace", anchor="", progress=False, **FAST, **FAST_A)
    fusion = er.manifest["fusion"]
    assert er.manifest["multi"] == "fuse" and set(fusion["modules"].values()) == {"sum"}
    assert fusion["module_streams"] == {}


def test_observed_grams_fuse_flux_add_kv_in_closed_form(tmp_path) -> None:
    """With ``fusion_observed_grams`` FLUX's add_k/add_v LoRAs are integrated with Grams of their inputs observed
    inside each block under the stage-A model: closed form per block, each concept reproduced better than by the
    sum, and re-fusion at other scales still works from the saved erasure."""
    er = erase(BUILDERS["flux"](), ["cat", "dog"], method="trace", anchor="", progress=False,
               fusion_observed_grams=True, **FAST, **FAST_A)
    fusion = er.manifest["fusion"]
    assert fusion["observed_grams"] is True and set(fusion["modules"].values()) == {"closed-form"}
    assert fusion["module_streams"] and all(m.endswith(("add_k_proj", "add_v_proj")) and s.startswith("block")
                                            for m, s in fusion["module_streams"].items())
    for c in fusion["concepts"]:
        cert = c["certificate"]
        assert cert["reproduction_error"] < cert["naive_sum_reproduction_error"]
    er.save(tmp_path / "e")
    loaded = load_erasure(tmp_path / "e")
    only_cat = concept_scaled(loaded, {"dog": 0})
    assert set(only_cat.deltas()) and any(
        not torch.allclose(a, b) for a, b in zip(only_cat.deltas().values(), loaded.deltas().values(), strict=True))


@pytest.fixture(scope="module")
def sd_fused(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi") / "e"
    er = erase(BUILDERS["sd"](), ["cat", "dog"], method="trace", anchor="", progress=False, **FAST, **FAST_A)
    er.save(folder)
    return er, folder


def test_sd_fusion_is_closed_form_with_a_certificate_per_concept(sd_fused) -> None:
    er, folder = sd_fused
    fusion = er.manifest["fusion"]
    assert set(fusion["modules"].values()) == {"closed-form"}
    assert [c["name"] for c in fusion["concepts"]] == ["cat", "dog"]
    assert [c["rank_slice"] for c in fusion["concepts"]] == [[0, 4], [4, 8]]
    for c in fusion["concepts"]:
        cert = c["certificate"]
        assert cert["reproduction_error"] < cert["naive_sum_reproduction_error"]
    loaded = load_erasure(folder)
    assert loaded.fusion_state is not None and set(loaded.state_dict) == set(er.state_dict)


def test_concept_scale_zero_equals_fusing_the_others_and_loads(sd_fused) -> None:
    from trace_erase.artifacts.lora import pairs_to_state
    from trace_erase.engines.fusion import inputs_from_tensors

    er, folder = sd_fused
    loaded = load_erasure(folder)
    scaled = concept_scaled(loaded, {"dog": 0})
    fusion = er.manifest["fusion"]
    inputs = inputs_from_tensors(loaded.fusion_state, 2, fusion["module_streams"])
    only_cat = FusionInputs(inputs.factors[:1], inputs.module_stream, inputs.grams[:1], inputs.preserve)
    fused_cat = fuse(only_cat, fusion["lambda"], fusion["lambda_preserve"])[0]
    expected = lora_to_delta(pairs_to_state(fused_cat, "unet"), "unet")
    stage_a = lora_to_delta({k[len("stage_a."):]: v for k, v in loaded.fusion_state.items()
                             if k.startswith("stage_a.")}, "unet")
    got = scaled.deltas()
    assert set(got) == set(expected)
    for m, delta in expected.items():  # stage A (joint, unscaled) + the fusion of cat's adapter alone
        assert torch.allclose(got[m], stage_a[m] + delta, atol=1e-5), m
    pipe = BUILDERS["sd"]()
    adapter = get_adapter(pipe)
    scaled.apply(pipe)
    zero = _pred(adapter, ["a photo of a dog"])
    loaded.apply(pipe)
    both = _pred(adapter, ["a photo of a dog"])
    assert (zero - both).abs().max() > 1e-6
    with pytest.raises(TraceEraseError, match="'bird' is not a concept of this erasure"):
        concept_scaled(loaded, {"bird": 0.5})


def test_single_concept_or_joint_erasure_has_no_per_concept_scales() -> None:
    er = erase(BUILDERS["sd"](), ["cat", "dog"], method="esd-x", progress=False, **FAST)
    assert er.manifest["multi"] == "joint" and "fusion" not in er.manifest
    with pytest.raises(TraceEraseError, match="no per-concept adapters"):
        concept_scaled(er, {"cat": 0.0})


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("extra,message", [
    (["--concept", "cat", "--concept", "dog", "--method", "uce", "--multi", "fuse"], "has no stage B"),
    (["--concept", "cat", "--concept", "dog", "--multi", "blend"], "unknown --multi 'blend'"),
    (["--concept", "cat", "--concept", "Cat"], "listed twice"),
    (["--config", "CFG"], "both an erased concept and the anchor"),
])
def test_multi_bad_input_is_one_line(saved_models, tmp_path, capsys, extra, message) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("concepts: [{name: cat, anchor: dog}, dog]\n")  # dog is erased and cat's anchor at once
    extra = [str(cfg) if a == "CFG" else a for a in extra]
    code, _, err = _run(["erase", "--model", saved_models["sd"], "--output", str(tmp_path / "e"), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_scale_concept_bad_input(saved_models, sd_fused, tmp_path, capsys) -> None:
    _, folder = sd_fused
    for value, message in (("dog", "must be NAME=S"), ("dog=x", "must be NAME=S"), ("bird=1", "not a concept")):
        code, _, err = _run(["generate", "--model", saved_models["sd"], "--erasure", str(folder), "--prompt", "a",
                             "--steps", "1", "--scale-concept", value, "--output", str(tmp_path / "g")], capsys)
        assert code == 2 and message in err, err


def test_killed_between_two_concepts_then_resumed_is_bit_identical(saved_models, tmp_path) -> None:
    from .test_faults import killed

    fast = ["--option", "templates=['{}']", "--option", "steps=3", "--option", "rollout_steps=2",
            "--option", "pool_trajectories=1", "--option", "checkpoint_every=1", "--option", "preserve_corpus=null"]
    argv = ["erase", "--model", saved_models["sd"], "--concept", "cat", "--concept", "dog", "--method", "trace",
            "--device", "cpu", *fast]
    assert main([*argv, "--output", str(tmp_path / "ref")]) == 0
    cut = [*argv, "--output", str(tmp_path / "cut")]
    proc = killed(cut, "trace_erase.multi", "", "_save", 1)  # after the first concept's LoRA is written
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "cut.partial" / "concept-000" / "lora.safetensors").is_file()
    assert not (tmp_path / "cut.partial" / "concept-001" / "lora.safetensors").exists()
    assert main([*cut, "--resume"]) == 0
    ref = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_per_concept_statistics_add_up_to_the_joint_ones() -> None:
    from trace_erase.config import make_concepts
    from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine

    engine = ClosedFormEngine(get_adapter(BUILDERS["sd"]()), ClosedFormConfig(
        templates=["{}", "a photo of {}"], probe_prompts=["a boat"]), progress=False)
    concepts = make_concepts(["cat", "dog"], preserve=["car"])
    joint = engine.statistics(concepts)
    per, merged = engine.concept_statistics(concepts)
    for name, st in joint.items():
        assert merged[name].counts == st.counts
        for field in ("g_e", "c", "g_a", "g_p", "g_q"):
            assert torch.allclose(getattr(merged[name], field), getattr(st, field), atol=1e-8), (name, field)
        summed = (per[0][name].g_e + per[1][name].g_e).double()  # Σᵢ Cᵢ = G_e (Cᵢ kept in float32)
        assert torch.allclose(summed, st.g_e, rtol=1e-5, atol=1e-4)
        assert per[0][name].rows + per[1][name].rows == st.counts["erase"]


def test_multi_bench_subsets_are_fixed_and_include_every_singleton() -> None:
    from trace_erase.benchmark.many_concepts import concept_sets

    classes = [f"c{i}" for i in range(10)]
    sets = concept_sets(classes, [1, 2, 5, 8], subsets=3)
    assert sets[1] == [[c] for c in classes]
    assert [len(s) for s in sets[5]] == [5, 5, 5] and all(len(set(s)) == 5 for s in sets[5])
    assert concept_sets(classes, [1, 2, 5, 8], subsets=3) == sets  # seeded: the same every run


def test_multi_bench_interference_and_worst_class() -> None:
    from trace_erase.benchmark.many_concepts import per_class_acc_e, summarize_multi

    base = {"acc_e": None, "acc_s": 1.0, "acc_g": None, "h_o": None, "drift_l2": 0.1}
    rows = [{"n": 1, "set": ["a"], "method": "m", **base, "per_class_acc_e": {"a": 0.0}},
            {"n": 1, "set": ["b"], "method": "m", **base, "per_class_acc_e": {"b": 0.2}},
            {"n": 2, "set": ["a", "b"], "method": "m", **base, "per_class_acc_e": {"a": 0.4, "b": 0.2}}]
    summary = {e["n"]: e for e in summarize_multi(rows, [1, 2])}
    assert summary[2]["interference"] == pytest.approx((0.4 - 0.0 + 0.2 - 0.2) / 2)
    assert summary[2]["worst_acc_e"] == pytest.approx(0.4) and summary[1]["interference"] == 0.0
    results = {"prompts": [{"group": "erased", "label": "a"}, {"group": "erased", "label": "a"},
                           {"group": "other", "label": "c"}],
               "per_image": [{"erased": {"label": "a"}}, {"erased": {"label": "x"}}, {"erased": {"label": "c"}}]}
    assert per_class_acc_e(results) == {"a": 0.5}


@pytest.mark.parametrize("value,message", [("1,x", "must list concept counts"), ("0,2", "between 1 and 9"),
                                           ("12", "between 1 and 9")])
def test_bench_multi_bad_counts_are_one_line(saved_models, tmp_path, capsys, value, message) -> None:
    code, _, err = _run(["bench", "--model", saved_models["sd"], "--output", str(tmp_path / "b"), "--methods", "uce",
                         "--multi", value], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_two_processes_share_the_concepts_and_match_one(saved_models, tmp_path) -> None:
    """Under ``accelerate launch`` with two CPU processes each trains its share of the concepts; the result equals
    the one-process erasure bit for bit."""
    from .conftest import run_cli

    args = ["erase", "--model", saved_models["sd"], "--concept", "cat", "--concept", "dog", "--method", "trace",
            "--device", "cpu", "--option", "templates=['{}']", "--option", "steps=2", "--option", "rollout_steps=2",
            "--option", "pool_trajectories=1", "--option", "preserve_corpus=null"]
    one = run_cli([*args, "--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli([*args, "--output", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "two.partial").exists()
    log = json.loads((tmp_path / "two" / "erasure.json").read_text())["trajectory_log"]
    assert log["other_processes"] == ["dog"] and list(log["final_losses"]) == ["cat"]  # each trained its share


def test_ant_erases_several_concepts_its_own_way() -> None:
    """ANT's Multiple/ recipe: per-concept LoRAs fused, with its multi-concept cut-off; one concept keeps its own."""
    from trace_erase.api import method_configs
    from trace_erase.methods import get_method
    from trace_erase.multi import resolve_multi

    ant = get_method("ant")
    assert resolve_multi(ant, None, 2) == "fuse" and resolve_multi(get_method("esd-x"), None, 2) == "joint"
    assert method_configs(ant, {"multi": None})[1].tau == 0.86
    assert method_configs(ant, {"multi": "fuse"})[1].tau == 0.92
    assert method_configs(ant, {"multi": "joint", "tau": 0.8})[1].tau == 0.8
    assert method_configs(get_method("trace"), {"multi": "fuse"})[1].tau == method_configs(
        get_method("trace"), {"multi": None})[1].tau


# ---- null space: the fused LoRA does not read the retained prompts' token directions -------------------------------
def test_null_space_leaves_retained_rows_unchanged_exactly() -> None:
    """With the retained rows' whole span projected out, ΔW* r = 0 for every retained row r (and not without)."""
    inputs, e, _, w = _synthetic(3)
    g = torch.Generator().manual_seed(5)
    kept = torch.randn(2, 6, generator=g, dtype=torch.float64)  # two retained token directions in d = 6
    inputs.retained = {"s": kept.T @ kept}
    plain, _, _ = fuse(inputs, 0.1, 1.0)
    projected, _, _ = fuse(inputs, 0.1, 1.0, null_space=1.0)
    assert (_dense(plain) @ kept.T).abs().max() > 1e-2
    assert (_dense(projected) @ kept.T).abs().max() < 1e-10
    # only the retained span is removed: on directions orthogonal to it the fused LoRA is unchanged
    q, _ = torch.linalg.qr(kept.T, mode="complete")
    free = q[:, 2:]
    assert torch.allclose(_dense(projected) @ free, _dense(plain) @ free, atol=1e-12)
    # a concept at scale 0 still equals fusing the others, with the same projection
    without = FusionInputs(inputs.factors[:2], inputs.module_stream, inputs.grams[:2], inputs.preserve,
                           inputs.retained)
    dropped, _, _ = fuse(inputs, 0.1, 1.0, scales=[1.0, 1.0, 0.0], null_space=1.0)
    assert torch.allclose(_dense(dropped), _dense(fuse(without, 0.1, 1.0, null_space=1.0)[0]), atol=1e-12)


def test_null_space_share_keeps_the_leading_directions() -> None:
    from trace_erase.engines.fusion import retained_basis

    scales = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1),
                                        dtype=torch.float64))[0]
    gram = basis @ torch.diag(scales) @ basis.T
    assert retained_basis(gram, 1.0).shape[1] == 3  # the whole span: the zero eigenvalue is not in it
    assert retained_basis(gram, 0.7).shape[1] == 1  # 10 / 14 ≥ 0.7
    assert retained_basis(gram, 0.9).shape[1] == 2
    top = retained_basis(gram, 0.7)[:, 0]
    assert torch.allclose(top.abs(), basis[:, 0].abs(), atol=1e-10)  # the largest direction, not another


def _kv_outputs(pipe, prompt: str) -> list[torch.Tensor]:
    """Every cross-attention K/V projection's output for ``prompt`` in one denoiser call."""
    adapter = get_adapter(pipe)
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone()))
             for name, m in adapter.denoiser.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]
    try:
        _pred(adapter, [prompt])
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_null_space_fusion_keeps_a_retained_prompts_kv_exactly(tmp_path, sd_fused) -> None:
    """End to end on SD: with ``fusion_null_space=1`` a --preserve prompt (and the empty prompt) gets exactly the
    stage-A model's K/V (1e-5); the same erasure without the projection changes them."""
    er = erase(BUILDERS["sd"](), ["cat", "dog"], method="trace", anchor="", progress=False, fusion_null_space=1.0,
               **FAST, **FAST_A)
    assert er.manifest["fusion"]["null_space"] == 1.0 and er.manifest["fusion"]["null_space_rank"]
    er.save(tmp_path / "ns")
    loaded = load_erasure(tmp_path / "ns")
    assert set(loaded.fusion_state) >= {k for k in loaded.fusion_state if k.startswith("retained.")} != set()
    for erasure, exact in ((loaded, True), (load_erasure(sd_fused[1]), False)):
        stage_a_only = concept_scaled(erasure, {"cat": 0, "dog": 0})
        for prompt in ("a photo of boat", ""):
            pipe = BUILDERS["sd"]()
            erasure.apply(pipe)
            full = _kv_outputs(pipe, prompt)
            stage_a_only.apply(pipe)
            ref = _kv_outputs(pipe, prompt)
            worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(full, ref, strict=True))
            assert (worst < 1e-5) if exact else (worst > 1e-4), (prompt, exact, worst)
    # re-fusion at other scales keeps the projection (it is read from the manifest)
    half = concept_scaled(loaded, {"cat": 0.5})
    pipe = BUILDERS["sd"]()
    half.apply(pipe)
    got = _kv_outputs(pipe, "a photo of boat")
    concept_scaled(loaded, {"cat": 0, "dog": 0}).apply(pipe)
    ref = _kv_outputs(pipe, "a photo of boat")
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref, strict=True)) < 1e-5


def test_preserve_growth_weighs_the_preserved_tokens_by_the_number_of_concepts() -> None:
    """``preserve_growth`` g: fusing n concepts uses λ_p·n^g (1: linear, as MACE raises its weight with N); a concept
    at scale 0 does not count, so dropping it still equals fusing the others."""
    inputs, _, _, _ = _synthetic(3)
    grown, _, _ = fuse(inputs, 0.1, 0.7, preserve_growth=1.0)
    assert torch.allclose(_dense(grown), _dense(fuse(inputs, 0.1, 2.1)[0]), atol=1e-12)
    assert not torch.allclose(_dense(grown), _dense(fuse(inputs, 0.1, 0.7)[0]), atol=1e-6)
    without = FusionInputs(inputs.factors[:2], inputs.module_stream, inputs.grams[:2], inputs.preserve)
    dropped, _, _ = fuse(inputs, 0.1, 0.7, scales=[1.0, 1.0, 0.0], preserve_growth=2.0)
    assert torch.allclose(_dense(dropped), _dense(fuse(without, 0.1, 0.7 * 4)[0]), atol=1e-12)
    with pytest.raises(TraceEraseError, match="fusion_preserve_growth must be ≥ 0"):
        from trace_erase.engines.trajectory_config import TrajectoryConfig

        TrajectoryConfig.from_options({"fusion_preserve_growth": -1})
