"""The preimage branch of stage B (engines/preimage.py) on tiny SD1.x and SDXL fixtures: the map undoes stage A for
the concept, the branch's terms have the concept prompt's targets in their windows, it is off by default and refused
where it cannot run, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.api import method_configs
from trace_erase.artifacts.checkpoint import load_checkpoint
from trace_erase.config import Concept
from trace_erase.engines.closed_form import ClosedFormEngine
from trace_erase.engines.preimage import PreimageMap
from trace_erase.engines.rece import adversarial_map, projection_gram
from trace_erase.engines.stage_a import StageAWeights
from trace_erase.engines.trajectory import CHECKPOINT_NAME, TrajectoryEngine, reversed_guidance
from trace_erase.engines.trajectory_config import TrajectoryConfig
from trace_erase.errors import TraceEraseError
from trace_erase.methods import METHODS, get_method

from .conftest import BUILDERS, stop_after_first_checkpoint

CAT = [Concept("cat", anchor="dog")]
# a stage A that moves the concept onto its anchor (no caption corpus holding every direction of the tiny encoder)
STAGE_A = {"templates": ["{}", "a photo of {}"], "preserve_corpus": None}
FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2, "checkpoint_every": 1000}


def _stage_a(adapter, cf_options: dict | None = None) -> tuple[StageAWeights, ClosedFormEngine]:
    cf = method_configs(get_method("trace"), {**STAGE_A, **(cf_options or {})})[0]
    engine = ClosedFormEngine(adapter, cf, progress=False)
    return StageAWeights(adapter, engine.run(CAT).deltas), engine


def _columns(adapter, name: str, w: torch.Tensor) -> torch.Tensor:
    stream = next(s for s in adapter.text_streams() if name in s.modules)
    lo, hi = stream.columns or (0, w.shape[1])
    return w[:, lo:hi].double()


# ---- 1. the map ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_preimage_gives_the_stage_a_model_the_original_keys_and_values(name: str) -> None:
    """For every edited projection (SD's and SDXL's cross-attention K/V, SDXL's pooled projection too):
    ‖W S c′ − W c‖ / ‖W c − W a‖ is small at a small ridge; the identity or Sᵀ in place of the solve is not."""
    adapter = get_adapter(BUILDERS[name]())
    stage_a, engine = _stage_a(adapter)
    lam = 1e-4
    pre = PreimageMap(adapter, stage_a, lam)
    c, a = adapter.conditioning(["a photo of cat"]), adapter.conditioning(["a photo of dog"])
    stats = engine.statistics(CAT)
    wrong = {}
    for stream in adapter.text_streams():
        key = adapter.stream_conditioning[stream.name]
        s = engine.stream_solution(stats[stream.name])
        base = [_columns(adapter, n, stage_a.base[n]) for n in stream.modules]
        # the map built from the weights is RECE's closed form in S (W' = W·S, K = Σ WᵀW)
        torch.testing.assert_close(pre.maps[key].double(), adversarial_map(s, projection_gram(base), lam),
                                   rtol=1e-3, atol=1e-4)
        wrong[key] = {"identity": torch.eye(s.shape[0], dtype=torch.float64), "transpose": s.T}
    assert set(pre.maps) == ({"encoder_hidden_states", "text_embeds"} if name == "sdxl" else {"encoder_hidden_states"})
    errors: dict[str, list[float]] = {"preimage": [], "identity": [], "transpose": []}
    for stream in adapter.text_streams():
        key = adapter.stream_conditioning[stream.name]
        x, xa = c.tensors[key].double(), a.tensors[key].double()
        for n in stream.modules:
            w, w_a = _columns(adapter, n, stage_a.base[n]), _columns(adapter, n, stage_a.edited[n])
            gap = (x @ w.T - xa @ w.T).norm()
            assert gap > 0
            errors["preimage"].append(float((pre(c).tensors[key].double() @ w_a.T - x @ w.T).norm() / gap))
            for kind, m in wrong[key].items():
                errors[kind].append(float((x @ m.T @ w_a.T - x @ w.T).norm() / gap))
    assert len(errors["preimage"]) == len(stage_a.params)
    assert max(errors["preimage"]) < 0.01, errors["preimage"]
    assert min(errors["identity"]) > 0.3 and min(errors["transpose"]) > 0.3, errors


# ---- 2. the branch's terms -------------------------------------------------------------------------------------------
def _engine(adapter, stage_a: StageAWeights, **options) -> TrajectoryEngine:
    tr = method_configs(get_method("trace"), {**FAST, **options})[1]
    engine = TrajectoryEngine(adapter, tr, progress=False, stage_a=stage_a)
    engine.concepts = CAT
    return engine


def test_branch_terms_are_the_concept_targets_at_the_preimage_in_their_windows() -> None:
    """Known answer on one EARLY and one LATE state: ``pre`` is the LATE state's distance from the erase target
    ε*(∅) − η(ε*(c) − ε*(∅)) and ``pre_early`` the EARLY state's from ε*(c) at the ORIGINAL c, both for the trained
    model's prediction at M c; the total adds them × preimage_weight and × preimage_weight·β. (η = 20: the tiny
    model's text barely moves its prediction, so the erase target would otherwise sit next to ε*(c).)"""
    adapter = get_adapter(BUILDERS["sd"]())
    stage_a, _ = _stage_a(adapter)
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 100])  # EARLY, LATE
    prompts = ["a photo of cat"] * 2
    terms = {}
    with stage_a.applied():
        for weight in (0.0, 2.0):
            eng = _engine(adapter, stage_a, preimage_weight=weight, eta=20.0)  # a target far from ε*(c)
            eng.attach()
            try:
                with torch.no_grad():
                    for p in eng.lora_parameters():
                        p.add_(0.05)
                    terms[weight] = eng.loss_terms(x, t, prompts, [])
                    if weight:
                        c, u = adapter.conditioning(prompts), adapter.conditioning([""] * 2)
                        pred = adapter.predict(x, t, eng.preimage_map()(c))
                        pred_c = adapter.predict(x, t, c)  # the trained model at the concept prompt itself
                        with eng.stage_a_model():
                            e_c, e_u = adapter.predict(x, t, c), adapter.predict(x, t, u)
            finally:
                eng.detach()
    on, off = terms[2.0], terms[0.0]
    target = reversed_guidance(e_u, e_c, e_u, 20.0)
    per = lambda a, b: float((a - b).pow(2).mean())  # noqa: E731
    late, early = per(pred[1], target[1]) / 2, per(pred[0], e_c[0]) / 2
    assert float(on["pre"]) == pytest.approx(late, rel=1e-4)
    assert float(on["pre_early"]) == pytest.approx(early, rel=1e-4)
    # the windows and targets matter: with the windows swapped (or the sign of the guidance flipped) each state
    # would meet the other target, a value far from these
    assert abs(per(pred[1], e_c[1]) / 2 - late) > 0.05 * late
    assert abs(per(pred[1], reversed_guidance(e_u, e_c, e_u, -20.0)[1]) / 2 - late) > 0.05 * late
    assert abs(per(pred[0], target[0]) / 2 - early) > 0.05 * early
    # the branch reads M c, not c (the tiny model's prediction moves little with its text: the term matches the
    # computation at M c far better than the one at c)
    at_c = per(pred_c[1], target[1]) / 2
    assert abs(float(on["pre"]) - late) < 0.05 * abs(at_c - late)
    assert "pre" not in off and float(on["erase"]) == pytest.approx(float(off["erase"]), rel=1e-4)
    beta = eng.config.beta
    assert float(on["total"]) - float(off["total"]) == pytest.approx(2.0 * (late + beta * early), rel=1e-3)


def test_sequential_and_batched_branches_give_the_same_gradients() -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    stage_a, _ = _stage_a(adapter)
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    grads = {}
    with stage_a.applied():
        for mode in ("batched", "sequential"):
            eng = _engine(adapter, stage_a, preimage_weight=1.0, branches=mode, gamma=0.0)
            eng.attach()
            try:
                with torch.no_grad():
                    for p in eng.lora_parameters():
                        p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
                for p in eng.lora_parameters():
                    p.requires_grad_(True)
                eng.loss_terms(x, torch.tensor([900, 100]), ["a photo of cat"] * 2, [], backward_scale=1.0)
                grads[mode] = torch.cat([p.grad.flatten() for p in eng.lora_parameters()])
            finally:
                eng.detach()
    assert grads["batched"].abs().max() > 0
    torch.testing.assert_close(grads["batched"], grads["sequential"], rtol=1e-4, atol=1e-8)


# ---- 3. off by default, refusals -------------------------------------------------------------------------------------
def test_off_by_default_and_round_trips() -> None:
    for name, spec in METHODS.items():
        _, tr = method_configs(spec, {})
        assert tr is None or (tr.preimage is None and not any(k.startswith("preimage_") for k in tr.options())), name
    on = TrajectoryConfig.from_options(preimage_weight=1.0)
    assert {k: v for k, v in on.options().items() if k.startswith("preimage_")} == {
        "preimage_weight": 1.0, "preimage_lambda": 0.01}
    assert TrajectoryConfig.from_options(on.options()) == on
    with pytest.raises(TraceEraseError, match="preimage_lambda is read only when preimage is on"):
        TrajectoryConfig.from_options(preimage_lambda=0.1)
    with pytest.raises(TraceEraseError, match="preimage_lambda must be > 0"):
        TrajectoryConfig.from_options(preimage_weight=1.0, preimage_lambda=0.0)


@pytest.mark.parametrize("pipeline, method, value, message", [
    ("StableDiffusionPipeline", "trace", "-1", "preimage_weight must be ≥ 0"),
    ("FluxPipeline", "trace", "1", "preimage_weight runs on sd, sdxl .*not flux; drop preimage_weight"),
    ("StableDiffusion3Pipeline", "trace", "1", "not sd3; drop preimage_weight"),
    ("StableDiffusionPipeline", "esd-x", "1", "has no stage A; use --method trace"),
])
def test_bad_input_is_one_line_and_exit_2_before_a_model_loads(tmp_path, capsys, pipeline, method, value,
                                                                message) -> None:
    from trace_erase.cli import main

    # a folder with only its model_index.json: loading it would fail with another message, so the refusal is first
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    code = main(["erase", "--model", str(tmp_path / "m"), "--concept", "cat", "--method", method,
                 "--option", f"preimage_weight={value}", "--output", str(tmp_path / "o")])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_a_loaded_flux_model_is_refused_too() -> None:
    """Python users who build the engine themselves get the family's refusal when the map is built."""
    adapter = get_adapter(BUILDERS["flux"]())
    with pytest.raises(TraceEraseError, match="not flux; drop preimage_weight"):
        PreimageMap(adapter, StageAWeights(adapter, {}), 0.01)


# ---- 4. resume -------------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    opts = dict(FAST, steps=4, checkpoint_every=2, pool_trajectories=2, refresh_every=3, templates=["{}"],
                preserve_corpus=None, preimage_weight=1.0)
    full = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, **opts)
    assert full.manifest["trajectory_log"]["final_losses"]["pre"] > 0
    assert full.manifest["config"]["trajectory"]["preimage"] == {"weight": 1.0, "lam": 0.01}
    stop_after_first_checkpoint(monkeypatch, lambda: erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog",
                                                           progress=False, workdir=tmp_path, **opts))
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2 and state["run_config"]["trajectory"]["preimage_weight"] == 1.0
    with pytest.raises(TraceEraseError, match="preimage_weight"):  # the branch's settings are the run's
        erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir=tmp_path,
              **{**opts, "preimage_weight": 2.0})
    loaded = []
    load = TrajectoryEngine.load_checkpoint
    monkeypatch.setattr(TrajectoryEngine, "load_checkpoint", lambda self, opt: loaded.append(load(self, opt)) or
                        loaded[-1])
    resumed = erase(BUILDERS["sd"](), ["cat"], method="trace", anchor="dog", progress=False, workdir=tmp_path,
                    **opts)
    assert [r[0] for r in loaded] == [2]  # it did start from the checkpoint
    assert full.state_dict.keys() == resumed.state_dict.keys()
    for k, v in full.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k
