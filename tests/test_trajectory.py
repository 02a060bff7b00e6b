"""Stage B: the trajectory engine on tiny SD1.x / SD2.x-v / SDXL / FLUX fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline

from trace_erase import erase, get_adapter, load_erasure
from trace_erase.artifacts.erasure import Erasure
from trace_erase.config import Concept
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.errors import NonFiniteLossError, TraceEraseError
from trace_erase.models import ModelHandle
from trace_erase.models.loading import null_components
from trace_erase.sampling import generate_images, sampler_settings

from .conftest import BUILDERS
from .test_closed_form import _pred

FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 1, "checkpoint_every": 1000}
FAST_A = {"templates": ["{}", "a photo of {}"]}


@pytest.mark.parametrize("method", ["trace", "trace-late-only", "trace-stage-b", "esd-x", "esd-u", "ant"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_method_runs_and_loads(method, name, tmp_path, saved_models) -> None:
    pipe = DiffusionPipeline.from_pretrained(saved_models[name], **null_components(saved_models[name]))
    extra = FAST_A if method.startswith("trace") and method != "trace-stage-b" else {}
    er = erase(pipe, ["cat"], method=method, anchor="dog", progress=False, **FAST, **extra)
    er.save(tmp_path / "e")
    assert not pipe.get_list_adapters(), "training adapter must be removed"
    fresh = DiffusionPipeline.from_pretrained(saved_models[name], **null_components(saved_models[name]))
    fresh.load_lora_weights(str(tmp_path / "e"))  # plain diffusers
    plain = DiffusionPipeline.from_pretrained(saved_models[name], **null_components(saved_models[name]))
    base = _pred(get_adapter(plain), ["a photo of a cat"])
    assert torch.isfinite(_pred(get_adapter(fresh), ["a photo of a cat"])).all()
    m = load_erasure(tmp_path / "e").manifest
    assert m["method"] == method and m["trajectory_log"]["steps"] == 2
    assert ("certificate" in m) == (method.startswith("trace") and method != "trace-stage-b")  # stage A certifies
    assert base.shape == _pred(get_adapter(pipe), ["a photo of a cat"]).shape


@pytest.mark.parametrize("name", list(BUILDERS))
def test_late_window_is_low_noise(name) -> None:
    adapter = get_adapter(BUILDERS[name]())
    sched = adapter.rollout_scheduler(20)
    times = adapter.model_time(sched.timesteps.float())
    late = adapter.is_late(times, 0.5)
    k = int((~late).sum())
    assert 0 < k < 20 and not late[:k].any() and late[k:].all()  # sampling order: EARLY first, then LATE
    if adapter.time_kind == "ddpm":
        noise = (1 - adapter.pipe.scheduler.alphas_cumprod[sched.timesteps.long()]).sqrt()
        assert noise[late].max() < noise[~late].min()
    else:
        sigma = times / adapter.time_scale  # σ: the weight of the noise in x_t (SD3 counts it in thousandths)
        assert sigma[late].max() < 0.5 <= sigma[~late].min()


def _engine(name: str, **kw) -> TrajectoryEngine:
    adapter = get_adapter(BUILDERS[name]())
    return TrajectoryEngine(adapter, TrajectoryConfig.from_options(**{**FAST, **kw}), progress=False)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_frozen_branch_is_the_base_model_and_terms_vanish_at_init(name) -> None:
    eng = _engine(name, rho=1.0, gamma=1.0, window="two")
    reference = get_adapter(BUILDERS[name]())
    eng.attach()
    try:
        x = torch.randn(eng.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([900, 100]) if eng.adapter.time_kind == "ddpm" else torch.tensor([0.9, 0.1])
        terms = eng.loss_terms(x, t, ["a photo of a cat"] * 2, ["a red car"])
        assert terms["erase"] > 0  # LATE sample: reversed guidance differs from θ*
        for k in ("early", "unc", "pres"):
            assert terms[k].abs() < 1e-10, (k, float(terms[k]))
        with torch.no_grad():  # make the LoRA non-zero, then compare the frozen branch with the plain model
            for p in eng.lora_parameters():
                p.add_(0.1)
        cond = eng.cond(["a photo of a cat", ""])
        with torch.no_grad(), eng.stage_a_model():
            frozen = eng.adapter.predict(x, t, cond)
        with torch.no_grad():
            live = eng.adapter.predict(x, t, cond)
            ref = reference.predict(x, t, reference.conditioning(["a photo of a cat", ""]))
        assert (frozen - ref).abs().max() < 1e-6
        assert (live - ref).abs().max() > 1e-4
    finally:
        eng.detach()


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_sequential_branches_give_the_batched_gradients(name) -> None:
    """Backpropagating branch by branch (low peak memory) accumulates exactly the batched call's gradients."""
    grads, values = {}, {}
    for mode in ("batched", "sequential"):
        eng = _engine(name, rho=1.0, gamma=0.5, window="two", branches=mode)
        eng.attach()
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                for p in eng.lora_parameters():
                    p.normal_(0, 0.05)
            params = eng.lora_parameters()
            for p in params:
                p.requires_grad_(True)
            x = torch.randn(eng.adapter.latent_shape(2), generator=torch.Generator().manual_seed(1))
            t = torch.tensor([900, 100]) if eng.adapter.time_kind == "ddpm" else torch.tensor([0.9, 0.1])
            terms = eng.loss_terms(x, t, ["a photo of a cat"] * 2, ["a red car"], backward_scale=0.5)
            values[mode] = {k: float(v) for k, v in terms.items()}
            grads[mode] = torch.cat([p.grad.flatten() for p in params])
        finally:
            eng.detach()
    assert grads["batched"].abs().max() > 0
    assert torch.allclose(grads["batched"], grads["sequential"], rtol=1e-4, atol=1e-7)
    for k, v in values["batched"].items():
        assert v == pytest.approx(values["sequential"][k], rel=1e-4, abs=1e-8), k


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch) -> None:
    pipe = BUILDERS["sd"]()
    calls = {"n": 0}
    original = TrajectoryEngine.loss_terms

    def flaky(self, *a, **k):
        calls["n"] += 1
        terms = original(self, *a, **k)
        if calls["n"] >= 4:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(TrajectoryEngine, "loss_terms", flaky)
    w0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 3.*--resume"):
        erase(pipe, ["cat"], method="esd-x", progress=False, workdir=tmp_path / "w",
              **{**FAST, "steps": 6, "checkpoint_every": 2})
    assert (tmp_path / "w" / "trajectory_checkpoint.pt").exists()
    assert not pipe.get_list_adapters()
    assert all(torch.equal(p, w0[n]) for n, p in pipe.unet.named_parameters())


def test_nonfinite_gradients_under_a_finite_loss_stop_before_the_step(tmp_path, monkeypatch) -> None:
    """A NaN gradient with a finite loss (on an H200: cuDNN's bf16 attention backward) is refused before opt.step
    writes it into the LoRA; without the check the run dies one step later blaming the learning rate."""
    pipe = BUILDERS["sd"]()
    original = TrajectoryEngine.attach
    calls = {"n": 0}

    def poisoned(self) -> None:
        original(self)
        first = self.lora_parameters()[0]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return grad * float("nan") if calls["n"] >= 3 else grad

        first.register_hook(hook)

    monkeypatch.setattr(TrajectoryEngine, "attach", poisoned)
    with pytest.raises(NonFiniteLossError, match="gradients became non-finite at step 2 with a finite loss.*lower lr"):
        erase(pipe, ["cat"], method="esd-x", progress=False, workdir=tmp_path / "w",
              **{**FAST, "steps": 5, "checkpoint_every": 1, "branches": "batched"})
    from trace_erase.engines.checkpointing import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "w" / "trajectory_checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["lora"].values())
    assert not pipe.get_list_adapters()


def _poison_backward(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> dict[str, int]:
    """NaN gradients on the first LoRA parameter at the given backward calls (1-based): an attention kernel's bug."""
    original = TrajectoryEngine.attach
    seen = {"n": 0}

    def poisoned(self) -> None:
        original(self)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            seen["n"] += 1
            return grad * float("nan") if seen["n"] in calls else grad

        self.lora_parameters()[0].register_hook(hook)

    monkeypatch.setattr(TrajectoryEngine, "attach", poisoned)
    return seen


def test_nonfinite_gradients_recompute_the_step_with_the_math_kernel(monkeypatch) -> None:
    """Under attention_kernels=auto a step with non-finite gradients (finite loss) is recomputed on the same batch
    with the math kernel, which the run keeps: the LoRA equals a clean run's, and the manifest says where it switched.
    With a kernel choice of the user's own (here: torch) the run stops instead."""
    run = {**FAST, "steps": 4, "branches": "batched"}
    clean = erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, **run)
    with monkeypatch.context() as m:
        seen = _poison_backward(m, {3})
        er = erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, **run)
    assert seen["n"] == 5  # four steps and the recomputed one
    assert er.manifest["trajectory_log"]["attention_fallback"] == {"step": 2, "to": "math"}
    assert "attention_fallback" not in clean.manifest["trajectory_log"]
    assert clean.state_dict.keys() == er.state_dict.keys()
    assert all(torch.equal(clean.state_dict[k], er.state_dict[k]) for k in clean.state_dict)
    _poison_backward(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError, match="non-finite at step 2 with a finite loss"):
        erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, attention_kernels="torch", **run)


def test_fp16_steps_that_all_overflow_stop_instead_of_training_nothing(monkeypatch) -> None:
    """fp16's loss scaler skips a step whose gradients overflow; when every step does (a kernel's NaN backward), the
    scale halves forever and the run would end with an untrained LoRA. Below scale 1 it stops, naming the fix. (fp16
    training is refused on the CPU, so the scaler is put on a CPU fp32 run here: its skipping is the same.)"""
    original = TrajectoryEngine.__init__

    def with_scaler(self, *a, **k) -> None:
        original(self, *a, **k)
        self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(TrajectoryEngine, "__init__", with_scaler)
    _poison_backward(monkeypatch, set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="overflowed at every step up to step 16.*--dtype bf16"):
        erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, **{**FAST, "steps": 30})


def test_training_attention_kernels_on_cuda_leave_out_cudnn() -> None:
    """The kernel choice is made through torch's own switches (set here without a GPU: they are process flags)."""
    from trace_erase.runtime import training_attention

    b = torch.backends.cuda
    flags = lambda: (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),  # noqa: E731
                     b.math_sdp_enabled())
    before = flags()
    with training_attention(torch.device("cuda"), "auto"):
        assert flags() == (False, True, True, True)
    with training_attention(torch.device("cuda"), "math"):
        assert flags() == (False, False, False, True)
    with training_attention(torch.device("cuda"), "torch"), training_attention(torch.device("cpu"), "math"):
        assert flags() == before
    assert flags() == before
    with pytest.raises(TraceEraseError, match="unknown attention_kernels 'flash'"):
        TrajectoryConfig.from_options(attention_kernels="flash")


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.conftest import BUILDERS
    from trace_erase import erase
    from trace_erase.engines.trajectory import TrajectoryEngine
    original = TrajectoryEngine.save_checkpoint
    def save_then_die(self, step, opt, pool):
        original(self, step, opt, pool)
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    TrajectoryEngine.save_checkpoint = save_then_die
    erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir={workdir!r},
          templates=["{{}}"], steps=7, rollout_steps=4, pool_trajectories=2, refresh_every=3, batch_size=2,
          checkpoint_every=2)
''')


def test_sigkill_then_resume_matches_uninterrupted(tmp_path) -> None:
    import pathlib

    opts = dict(templates=["{}"], steps=7, rollout_steps=4, pool_trajectories=2, refresh_every=3, batch_size=2,
                checkpoint_every=2)
    full = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, **opts)
    workdir = tmp_path / "w"
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=root, workdir=str(workdir))],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    from trace_erase.artifacts.checkpoint import load_checkpoint

    assert load_checkpoint(workdir / "trajectory_checkpoint.pt")["step"] == 4
    resumed = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir=workdir,
                    **opts)
    for k, v in full.state_dict.items():
        assert (resumed.state_dict[k] - v).abs().max() <= 1e-6, k


def _record_latents(handle: ModelHandle) -> list[torch.Tensor]:
    """Latents after each step of one generation (the pipeline's own callback)."""
    seen: list[torch.Tensor] = []

    def grab(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    generate_images(handle, ["a photo of a cat"], [0], steps=10, guidance=3.0, progress=False,
                    callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    return seen


def test_gated_adapter_leaves_early_latents_identical(tmp_path) -> None:
    er = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, gate_tau=0.5,
               **{**FAST, **FAST_A, "steps": 3})
    assert er.gated_state_dict is not None and er.manifest["gate"]["tau"] == 0.5
    er.save(tmp_path / "e")
    gated = load_erasure(tmp_path / "e")
    stage_a_only = Erasure(gated.state_dict, {**gated.manifest, "gate": None})

    def latents_of(erasure: Erasure) -> tuple[list[torch.Tensor], ModelHandle, Any]:
        pipe = BUILDERS["sd"]()
        handle = ModelHandle(pipe, get_adapter(pipe), "tiny")
        applied = erasure.apply(handle)
        return _record_latents(handle), handle, applied

    with_gate, handle, applied = latents_of(gated)
    without, _, _ = latents_of(stage_a_only)
    weights = [w for _, w in applied.gate.history]
    n_early = weights.index(1.0)
    assert n_early > 0 and all(w == 0.0 for w in weights[:n_early]) and all(w == 1.0 for w in weights[n_early:])
    assert all(t >= 500 for t, _ in list(applied.gate.history)[:n_early])
    assert all(t < 500 for t, _ in list(applied.gate.history)[n_early:])
    for i in range(n_early):  # latents after each EARLY step: bit-identical to the stage-A model
        assert torch.equal(with_gate[i], without[i]), i
    assert not torch.equal(with_gate[-1], without[-1])  # the gated LoRA does act in LATE steps


def test_plain_pipeline_call_honours_the_gate(tmp_path) -> None:
    """After ``apply``, ``handle.pipe(prompt)`` — no callback, no helper — gives generate_images' image, and that
    image differs from the same erasure applied without its gate (so the gate is what the call honoured)."""
    import numpy as np

    er = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, gate_tau=0.5,
               **{**FAST, **FAST_A, "steps": 3, "lr": 1e-2})
    pipe = BUILDERS["sd"]()
    handle = ModelHandle(pipe, get_adapter(pipe), "tiny")
    er.apply(handle)
    ours = np.asarray(generate_images(handle, ["a photo of a cat"], [0], steps=10, guidance=3.0, progress=False)[0])
    latents = torch.randn(handle.adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
    size = sampler_settings(handle)["resolution"]
    plain = np.asarray(pipe("a photo of a cat", latents=latents, num_inference_steps=10, guidance_scale=3.0,
                            height=size, width=size).images[0])
    assert np.array_equal(plain, ours)
    merged = {**er.state_dict}
    for k, v in er.gated_state_dict.items():  # stage A and the gated part as one always-on LoRA
        merged[k] = torch.cat([merged[k], v], dim=0 if "lora_A" in k else 1) if k in merged else v
    always_on = Erasure(merged, {**er.manifest, "gate": None})
    always_on.apply(handle)  # replaces the gated erasure
    assert len(pipe.get_list_adapters()["unet"]) == 1, "apply must replace, not stack"
    on = np.asarray(pipe("a photo of a cat", latents=latents, num_inference_steps=10, guidance_scale=3.0,
                         height=size, width=size).images[0])
    assert not np.array_equal(on, plain)


def test_bad_trajectory_options() -> None:
    with pytest.raises(TraceEraseError, match="unknown window"):
        TrajectoryConfig.from_options(window="middle")
    with pytest.raises(TraceEraseError, match="tau must be in"):
        TrajectoryConfig.from_options(tau=0.0)
    with pytest.raises(TraceEraseError, match="unknown options for 'esd-x' \\['lambda_reg'\\]"):
        erase(BUILDERS["sd"](), ["cat"], method="esd-x", lambda_reg=1.0, progress=False)
    with pytest.raises(TraceEraseError, match="cannot be fused"):
        er = erase(BUILDERS["sd"](), [Concept("cat")], method="esd-x", gate_tau=0.5, progress=False, **FAST)
        er.merge_into(BUILDERS["sd"]())


def test_pres_corpus_feeds_l_pres_without_the_concepts_captions() -> None:
    """With ``pres_corpus`` the L_pres term is trained on corpus captions (none naming the concept) even when the
    concept lists no preserve prompts; without it the term stays zero."""
    from trace_erase.engines.prompts import read_corpus

    corpus = set(read_corpus("builtin"))
    for options, expect_pres in (({"pres_corpus": "builtin"}, True), ({}, False)):
        eng = _engine("sd", rho=1.0, steps=3, **options)
        seen: list[str] = []
        encode = eng.cond

        def recording(prompts: list[str], seen: list[str] = seen, encode=encode):
            seen.extend(prompts)
            return encode(prompts)

        eng.cond = recording  # type: ignore[method-assign]
        log = eng.train([Concept("cat")])
        used = {p for p in seen if p in corpus}
        assert bool(used) == expect_pres
        assert not any("cat" in p.split() for p in used)
        assert (log["final_losses"]["pres"] > 0) == expect_pres


def test_pres_corpus_needs_rho_and_an_existing_file(tmp_path) -> None:
    with pytest.raises(TraceEraseError, match="set rho > 0"):
        TrajectoryConfig.from_options(pres_corpus="builtin")
    with pytest.raises(TraceEraseError, match="does not exist"):  # refused before stage A spends any time
        TrajectoryConfig.from_options(rho=1.0, pres_corpus=str(tmp_path / "missing.txt"))


# ---- stage B's direction: the targets are the formulas, and training moves LATE predictions only --------------------


def _stage_a(name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine

    adapter = get_adapter(BUILDERS[name]())
    cfg = ClosedFormConfig(token_selection="surrounding", templates=["{}", "a photo of {}"], lambda_reg=0.1)
    deltas = ClosedFormEngine(adapter, cfg, progress=False).run([Concept("cat", anchor="dog")]).deltas
    return adapter, deltas


@pytest.mark.parametrize("reference", ["original", "stage-a"])
def test_stage_b_targets_follow_the_reference_model(reference) -> None:
    """LATE target ε_A(∅) − η(ε_r(c) − ε_r(∅)) with r = θ0 (original) or θ* (stage A), only on LATE samples; EARLY
    keeps ε_A(c). Fails if the windows are swapped, η's sign flipped or the reference is the other model."""
    from trace_erase.engines.stage_a import StageAWeights

    adapter, deltas = _stage_a("sd")
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 900])  # sample 0 LATE, sample 1 EARLY (τ = 0.5)
    cond = adapter.conditioning(["a photo of a cat", ""])
    with torch.no_grad():  # per sample: θ0's predictions for (c, ∅)
        e0 = [adapter.predict(x[i : i + 1].repeat(2, 1, 1, 1), t[i].repeat(2), cond) for i in range(2)]
    stage_a = StageAWeights(adapter, deltas)
    eng = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**FAST, reference=reference, eta=1.5, gamma=0.0),
                           progress=False, stage_a=stage_a)
    with stage_a.applied():
        with torch.no_grad():
            ea = [adapter.predict(x[i : i + 1].repeat(2, 1, 1, 1), t[i].repeat(2), cond) for i in range(2)]
        eng.attach()
        try:
            terms = eng.loss_terms(x, t, ["a photo of a cat"] * 2, [])
        finally:
            eng.detach()
    assert not stage_a.on and all(adapter.module(n).weight.data_ptr() == stage_a.base[n].data_ptr()
                                  for n in deltas)  # the base tensors are back
    per = lambda a, b: float((a - b).pow(2).mean())  # noqa: E731

    def erase_loss(ref_c: torch.Tensor, ref_u: torch.Tensor, sample: int, sign: float = -1.0) -> float:
        a_c, a_u = ea[sample][0], ea[sample][1]
        return per(a_c, a_u + sign * 1.5 * (ref_c - ref_u)) / 2  # live = θ* at init; mean over the batch of 2

    right = (e0[0][0], e0[0][1]) if reference == "original" else (ea[0][0], ea[0][1])
    wrong = (ea[0][0], ea[0][1]) if reference == "original" else (e0[0][0], e0[0][1])
    expected = erase_loss(*right, sample=0)
    assert float(terms["erase"].detach()) == pytest.approx(expected, rel=1e-5)
    for other in (erase_loss(*wrong, sample=0), erase_loss(*right, sample=0, sign=1.0),
                  erase_loss(ea[1][0], ea[1][1], sample=1)):  # wrong reference, flipped η, swapped window
        assert abs(other - expected) > 0.02 * expected, other
    assert float(terms["early"].detach()) < 1e-10  # EARLY keeps θ*'s prediction: zero at init


def test_anchor_reference_reverses_the_concept_relative_to_its_anchor_from_the_stage_a_prediction() -> None:
    """reference=anchor: LATE target ε_A(c) − η(ε0(c) − ε0(anchor prompt)), the anchor prompt being the training
    prompt with the concept replaced by its anchor. Fails if η's sign is flipped, if the anchor prompt is not the
    concept's own anchor, if θ* gives the direction, or if the base is ε_A(∅) (the stage-a/original targets)."""
    from trace_erase.config import Concept
    from trace_erase.engines.stage_a import StageAWeights

    adapter, deltas = _stage_a("sd")
    x = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100])  # LATE (τ = 0.5)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a", ""]
    cond = adapter.conditioning(prompts)
    with torch.no_grad():
        o = adapter.predict(x.repeat(4, 1, 1, 1), t.repeat(4), cond)  # θ0: cat, dog, anchor "", ∅
    stage_a = StageAWeights(adapter, deltas)
    eng = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**FAST, reference="anchor", eta=1.5, gamma=0.0),
                           progress=False, stage_a=stage_a)
    eng.concepts = [Concept("cat", anchor="dog")]
    assert eng.anchor_prompt("a photo of a cat") == "a photo of a dog"
    eng.concepts = [Concept("cat", anchor="")]
    assert eng.anchor_prompt("a photo of a cat") == "a photo of a"
    with stage_a.applied():
        with torch.no_grad():
            a = adapter.predict(x.repeat(4, 1, 1, 1), t.repeat(4), cond)  # θ*
        eng.attach()
        try:
            with torch.no_grad():  # a LoRA away from zero, so that the live prediction is not θ*'s (the loss at
                for p in eng.lora_parameters():  # θ* would not see η's sign)
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
                live = adapter.predict(x, t, adapter.conditioning(prompts[:1]))[0]
            terms = eng.loss_terms(x, t, ["a photo of a cat"], [])
        finally:
            eng.detach()
    per = lambda p, q: float((p - q).pow(2).mean())  # noqa: E731
    expected = per(live, a[0] - 1.5 * (o[0] - o[2]))
    assert float(terms["erase"].detach()) == pytest.approx(expected, rel=1e-5)
    for other in (per(live, a[0] + 1.5 * (o[0] - o[2])),  # flipped η
                  per(live, a[0] - 1.5 * (o[0] - o[1])),  # another anchor
                  per(live, a[0] - 1.5 * (a[0] - a[2])),  # θ*'s direction
                  per(live, a[3] - 1.5 * (o[0] - o[3]))):  # the original reference's target
        assert abs(other - expected) > 0.02 * expected, other


def test_to_anchor_reference_targets_the_original_anchor_prediction_whatever_stage_a_did() -> None:
    """reference=to-anchor: LATE target ε0(anchor prompt) − (η − 1)(ε0(c) − ε0(anchor prompt)). Fails if the base is
    θ*'s prediction (reference=anchor), if (η − 1)'s sign flips, or if the anchor prompt is not the concept's."""
    from trace_erase.config import Concept
    from trace_erase.engines.stage_a import StageAWeights

    adapter, deltas = _stage_a("sd")
    x = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100])  # LATE (τ = 0.5)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a"]
    cond = adapter.conditioning(prompts)
    with torch.no_grad():
        o = adapter.predict(x.repeat(3, 1, 1, 1), t.repeat(3), cond)  # θ0: cat, dog, anchor ""
    stage_a = StageAWeights(adapter, deltas)
    eng = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**FAST, reference="to-anchor", eta=1.5, gamma=0.0),
                           progress=False, stage_a=stage_a)
    eng.concepts = [Concept("cat", anchor="")]
    with stage_a.applied():
        with torch.no_grad():
            a = adapter.predict(x, t, adapter.conditioning(prompts[:1]))  # θ*(cat)
        eng.attach()
        try:
            with torch.no_grad():
                for p in eng.lora_parameters():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
                live = adapter.predict(x, t, adapter.conditioning(prompts[:1]))[0]
            terms = eng.loss_terms(x, t, prompts[:1], [])
        finally:
            eng.detach()
    per = lambda p, q: float((p - q).pow(2).mean())  # noqa: E731
    expected = per(live, o[2] - 0.5 * (o[0] - o[2]))
    assert float(terms["erase"].detach()) == pytest.approx(expected, rel=1e-5)
    for other in (per(live, a[0] - 1.5 * (o[0] - o[2])),  # reference=anchor's target
                  per(live, o[2] + 0.5 * (o[0] - o[2])),  # (η − 1) flipped
                  per(live, o[1] - 0.5 * (o[0] - o[1]))):  # another anchor
        assert abs(other - expected) > 0.02 * expected, other


def test_anchor_reference_runs_the_original_model_only_on_the_erase_windows_rows() -> None:
    """In a batch of one LATE and one EARLY state the anchor target needs θ0 only for the LATE row: θ0 sees 2 rows
    (concept and anchor prompt of that state), and the terms equal the full computation's."""
    from trace_erase.config import Concept
    from trace_erase.engines.stage_a import StageAWeights

    adapter, deltas = _stage_a("sd")
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 100])  # EARLY, LATE (τ = 0.5)
    prompts = ["a photo of a cat", "a photo of a"]
    with torch.no_grad():
        o = adapter.predict(x[1:].repeat(2, 1, 1, 1), t[1:].repeat(2), adapter.conditioning(prompts))  # θ0, LATE
    stage_a = StageAWeights(adapter, deltas)
    eng = TrajectoryEngine(adapter, TrajectoryConfig.from_options(**FAST, reference="anchor", eta=1.5, gamma=0.0),
                           progress=False, stage_a=stage_a)
    eng.concepts = [Concept("cat", anchor="")]
    sizes: list[tuple[bool, int]] = []
    predict = adapter.predict

    def recording(xs, ts, cond):  # noqa: ANN001, ANN202
        sizes.append((stage_a.on, xs.shape[0]))
        return predict(xs, ts, cond)

    with stage_a.applied():
        with torch.no_grad():
            a = adapter.predict(x, t, adapter.conditioning(prompts[:1] * 2))  # θ*, concept prompt
        eng.attach()
        try:
            with torch.no_grad():
                for p in eng.lora_parameters():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
                live = adapter.predict(x, t, adapter.conditioning(prompts[:1] * 2))
            adapter.predict = recording  # type: ignore[method-assign]
            terms = eng.loss_terms(x, t, prompts[:1] * 2, [])
        finally:
            adapter.predict = predict  # type: ignore[method-assign]
            eng.detach()
    assert (False, 2) in sizes and all(n == 2 for on, n in sizes if not on)  # θ0: the LATE row's two prompts only
    target = a[1] - 1.5 * (o[0] - o[1])
    expected = float((live[1] - target).pow(2).mean()) / 2  # the erase term is a mean over the batch of 2
    assert float(terms["erase"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(terms["early"].detach()) == pytest.approx(float((live[0] - a[0]).pow(2).mean()) / 2, rel=1e-5)


def test_stage_b_moves_late_predictions_and_keeps_early_ones() -> None:
    """A micro-run of TRACE stage B (reference θ0) on toy-sd, erasing "circle": on a held-out trajectory of θ0 the
    LATE predictions move towards the reversed-guidance target, and far more than the EARLY ones move. (A random tiny
    model is no subject here: its concept direction is noise, and nothing generalises to a held-out trajectory.)"""
    from trace_erase import load_model
    from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
    from trace_erase.engines.stage_a import StageAWeights
    from trace_erase.methods.trace import STAGE_A

    adapter = load_model("toy-sd").adapter
    concept = Concept("circle")
    deltas = ClosedFormEngine(adapter, ClosedFormConfig(**STAGE_A), progress=False).run([concept]).deltas
    stage_a = StageAWeights(adapter, deltas)
    cfg = TrajectoryConfig.from_options(steps=60, lr=1e-3, rollout_steps=8, pool_trajectories=2, batch_size=4,
                           refresh_every=1000, checkpoint_every=1000, reference="original")
    eng = TrajectoryEngine(adapter, cfg, progress=False, stage_a=stage_a)
    prompt = "a photo of a circle"

    def predict(model: Any, states: torch.Tensor, times: torch.Tensor, text: str) -> torch.Tensor:
        with torch.no_grad():
            return model.predict(states, times, model.conditioning([text] * len(times)))

    states, times, _ = eng.rollout(prompt, torch.randn(adapter.latent_shape(1),
                                                       generator=torch.Generator().manual_seed(7)))  # θ0's
    late = adapter.is_late(times, cfg.tau)
    e0_c, e0_u = predict(adapter, states, times, prompt), predict(adapter, states, times, "")
    with stage_a.applied():
        ea_c, ea_u = predict(adapter, states, times, prompt), predict(adapter, states, times, "")
        state = eng.train([concept])["state_dict"]
    target = ea_u - cfg.eta * (e0_c - e0_u)
    trained = load_model("toy-sd")  # θ = θ0 + ΔW_A + stage-B LoRA, as an erasure applies it
    with torch.no_grad():
        for name, d in deltas.items():
            trained.adapter.module(name).weight.add_(d)
    trained.pipe.load_lora_weights(state)
    after = predict(trained.adapter, states, times, prompt)
    err = lambda a: (a - target)[late].pow(2).mean()  # noqa: E731
    assert err(after) < 0.7 * err(ea_c), (float(err(after)), float(err(ea_c)))
    move = (after - ea_c).flatten(1).norm(dim=1) / ea_c.flatten(1).norm(dim=1)
    assert move[late].mean() > 1.6 * move[~late].mean(), move


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_esd_u_trains_esds_own_layer_set(name) -> None:
    """ESD-u ("noxattn"): resnet convolutions, self-attention and feed-forward are trained; cross-attention, the
    time embedding and the output convolution are not. ESD-x: all four cross-attention projections."""
    adapter = get_adapter(BUILDERS[name]())
    u = adapter.lora_target_modules("non-cross")
    assert any(n.endswith("resnets.0.conv1") for n in u) and "conv_in" in u
    assert any(n.endswith("attn1.to_q") for n in u) and any(n.endswith("ff.net.2") for n in u)
    assert not any("attn2" in n or n.startswith("time_embedding") or n == "conv_out" for n in u)
    x = adapter.lora_target_modules("cross-attn")
    assert {n.rsplit("attn2.", 1)[1] for n in x} == {"to_q", "to_k", "to_v", "to_out.0"}


def test_kind_defaults_apply_to_their_model_kind_under_the_users_options() -> None:
    """A method's per-kind overrides reach each engine for that kind only, and an explicit option still wins."""
    import dataclasses

    from trace_erase.api import method_configs
    from trace_erase.methods import get_method

    trace = dataclasses.replace(get_method("trace"), kind_defaults={})  # the method defaults alone
    spec = dataclasses.replace(trace, kind_defaults={"flow": {"rece_rounds": 2, "reference": "original"}})
    for family in ("flux", "sd3"):
        cf, tr = method_configs(spec, {}, family)
        assert cf.rece_rounds == 2 and tr.reference == "original"
    for family in ("sd", "sdxl", None):  # latent diffusion, or the family not known yet: the method's own
        cf, tr = method_configs(spec, {}, family)
        base_cf, base_tr = method_configs(trace, {}, family)
        assert cf == base_cf and tr.options() == base_tr.options()
    cf, tr = method_configs(spec, {"rece_rounds": 1, "reference": "stage-a"}, "flux")
    assert cf.rece_rounds == 1 and tr.reference == "stage-a"
    bad = dataclasses.replace(trace, kind_defaults={"flow": {"no_such_option": 1}})
    with pytest.raises(TraceEraseError, match="no_such_option"):
        method_configs(bad, {}, "flux")


def test_trace_reference_default_is_chosen_per_model_kind() -> None:
    """Pinned: stage B trains against the anchor reference, at full strength with two RECE rounds of stage A for
    rectified flow (FLUX, SD3), at half strength with one solve for latent diffusion (the choices on each kind's
    development halves, docs/benchmarks/stage-b-reference.md and rece-rounds.md)."""
    from trace_erase.api import method_configs
    from trace_erase.methods import get_method

    for family, eta, rounds in (("flux", 1.0, 2), ("sd3", 1.0, 2), ("sd", 0.5, 0), ("sdxl", 0.5, 0)):
        cf, tr = method_configs(get_method("trace"), {}, family)
        assert tr.reference == "anchor" and tr.eta == eta and cf.rece_rounds == rounds, family
        # stage A alone is trace's stage A on every kind; the late-only ablation differs from trace in its window only
        assert method_configs(get_method("trace-closed-form"), {}, family)[0] == cf, family
        late_cf, late_tr = method_configs(get_method("trace-late-only"), {}, family)
        assert late_cf == cf and {**late_tr.options(), "window": tr.window} == tr.options(), family
    assert method_configs(get_method("trace"), {"reference": "stage-a"}, "flux")[1].reference == "stage-a"


def test_stage_b_base_original_trains_the_lora_on_the_model_without_stage_a(monkeypatch) -> None:
    """stage_b_base=original: while stage B trains, stage A's edit is off and the engine has no stage A (so its
    frozen branch, rollouts and references are θ0's); the default trains on θ*. Both artifacts carry stage A."""
    seen: list[tuple[bool, bool]] = []
    train = TrajectoryEngine.train

    def recording(self, concepts):  # noqa: ANN001, ANN202
        edited = any(not torch.equal(self.adapter.module(m).weight, base[m]) for m in base)
        seen.append((self.stage_a is not None, edited))
        return train(self, concepts)

    monkeypatch.setattr(TrajectoryEngine, "train", recording)
    pipe = BUILDERS["sd"]()
    adapter = get_adapter(pipe)
    base = {name: adapter.module(name).weight.detach().clone() for name in adapter.text_streams()[0].modules}
    parts = []
    for options in ({}, {"stage_b_base": "original"}):
        er = erase(pipe, ["cat"], method="trace", progress=False, **FAST, **FAST_A, **options)
        parts.append(er.manifest["lora"]["parts"])
    assert seen == [(True, True), (False, False)]
    assert parts == [["closed_form", "trajectory"]] * 2
    with pytest.raises(TraceEraseError, match="has no stage A"):
        erase(pipe, ["cat"], method="esd-x", progress=False, stage_b_base="original", **FAST)
    with pytest.raises(TraceEraseError, match="drop one of them"):
        erase(pipe, ["cat"], method="trace", progress=False, stage_b_base="original", preimage_weight=1.0, **FAST)
