"""AdvUnlearn (methods/advunlearn.py, engines/advunlearn.py): a text-encoder LoRA trained with ESD's loss against an
inner soft-prompt attack plus a retain term, on the tiny SD1.x / SDXL fixtures, and its exports."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from trace_erase import erase
from trace_erase.api import export_erasure, method_configs
from trace_erase.artifacts.erasure import remove_erasures
from trace_erase.artifacts.export import ExportOptions, apply_full
from trace_erase.cli import main
from trace_erase.config import Concept
from trace_erase.engines.advunlearn import TextEncoderEngine
from trace_erase.engines.pool import Pool, Trajectory
from trace_erase.methods import get_method
from trace_erase.models import ModelHandle, get_adapter
from trace_erase.models.loading import null_components

from .conftest import BUILDERS

FAST = {"steps": 3, "rollout_steps": 4, "pool_trajectories": 1, "checkpoint_every": 1000, "advunlearn_warmup": 1,
        "adversarial_every": 1, "adversarial_steps": 2, "advunlearn_retain_trajectories": 1,
        "advunlearn_retain_batch": 2}
CAT = [Concept("cat")]
PROMPTS = ["a photo of a cat", "a red dog"]


def _engine(name: str = "sd", **options) -> TextEncoderEngine:
    tr = method_configs(get_method("advunlearn"), {**FAST, **options})[1]
    eng = TextEncoderEngine(get_adapter(BUILDERS[name]()), tr, progress=False)
    eng.concepts = CAT
    return eng


def _pool(adapter) -> Pool:
    """One concept state and one retain state: every draw from the pool is known."""
    x, xr = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(1))
    return Pool([Trajectory(x[None], torch.tensor([601.0]), "cat"), Trajectory(xr[None], torch.tensor([201.0]),
                                                                                "a red dog")])


def _perturb(eng: TextEncoderEngine, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in eng.lora_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _text(pipe) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return get_adapter(pipe).conditioning(PROMPTS).tensors


# ---- (a) only the text encoder trains -----------------------------------------------------------------------------
def test_only_the_text_encoder_lora_trains() -> None:
    pipe = BUILDERS["sd"]()
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    er = erase(pipe, ["cat"], method="advunlearn", progress=False, **{**FAST, "lr": 1e-3})
    assert er.state_dict and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in er.state_dict)
    assert len(er.state_dict) == 2 * 6 * pipe.text_encoder.config.num_hidden_layers  # q, k, v, out, fc1, fc2
    assert all(float(v.abs().max()) > 0 for k, v in er.state_dict.items() if "lora_B" in k)  # B starts at zero
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # bit-identical
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert not pipe.get_list_adapters() and er.manifest["format_version"] == 4
    log = er.manifest["trajectory_log"]
    assert log["final_losses"]["retain"] > 0 and log["adversarial_losses"]["cat"] > 0


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    """The text-encoder LoRA, its optimiser, the pool (retain trajectories included) and the attack's slots are in
    the checkpoint: a run resumed from step 2 ends where an uninterrupted one does."""
    opts = {**FAST, "steps": 4, "lr": 1e-3}
    whole = erase(BUILDERS["sd"](), ["cat"], method="advunlearn", progress=False, **opts)
    erase(BUILDERS["sd"](), ["cat"], method="advunlearn", progress=False, workdir=tmp_path,
          **{**opts, "checkpoint_every": 2})  # leaves its step-2 checkpoint behind
    resumed = erase(BUILDERS["sd"](), ["cat"], method="advunlearn", progress=False, workdir=tmp_path,
                    **{**opts, "checkpoint_every": 2})
    assert all(torch.equal(whole.state_dict[k], resumed.state_dict[k]) for k in whole.state_dict)


# ---- (b) the loss, by hand ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["warmup", "adversarial"])
def test_loss_is_esd_on_the_text_encoder_plus_the_retain_term(phase: str) -> None:
    """ESD's target from the frozen original model (η = 1: ε0(∅) − (ε0(c) − ε0(∅))) against the trained encoder's
    prediction for the concept prompt (after the warmup: with the attack's slots in front), plus 0.3 × the retain
    MSE against the original model on the retain caption's own state."""
    eng = _engine(advunlearn_retain_batch=1)
    adapter, fresh = eng.adapter, get_adapter(BUILDERS["sd"]())  # fresh: the original model, independently
    pool = _pool(adapter)
    eng.retain, eng._retain_set = ["a red dog"], {"a red dog"}
    eng.attach()
    try:
        _perturb(eng)
        if phase == "adversarial":
            from trace_erase.engines.adversarial import AdversarialPrompts

            eng.adversarial = AdversarialPrompts(eng, CAT, restart=True)
            eng.adversarial.values["cat"] = eng.adversarial.slots.init_random(torch.Generator().manual_seed(3))
        eng._pool, eng._step = pool, (0 if phase == "warmup" else 5)
        with torch.no_grad():
            terms = eng.loss_terms(pool.trajectories[0].states, torch.tensor([601.0]), ["cat"], [])
            x, t, xr, tr = pool.trajectories[0].states, torch.tensor([601.0]), pool.trajectories[1].states, \
                torch.tensor([201.0])
            e_c, e_u = (fresh.predict(x, t, fresh.conditioning([p])) for p in ("cat", ""))
            if phase == "adversarial":
                slots = eng.adversarial.slots
                with slots.active(eng.adversarial.values["cat"]):
                    trained = adapter.conditioning([slots.prefixed("cat")])
            else:
                trained = adapter.conditioning(["cat"])
            pred = adapter.predict(x, t, trained)
            kept = fresh.predict(xr, tr, fresh.conditioning(["a red dog"]))
            retained = adapter.predict(xr, tr, adapter.conditioning(["a red dog"]))
    finally:
        eng.detach()
    erase_ = (pred - (e_u - (e_c - e_u))).pow(2).mean()
    retain = (retained - kept).pow(2).mean()
    assert retain.item() > 1e-6 and erase_.item() > 0
    assert terms["erase"].item() == pytest.approx(erase_.item(), rel=1e-5)
    assert terms["retain"].item() == pytest.approx(retain.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((erase_ + 0.3 * retain).item(), rel=1e-5)
    flipped = (pred - (e_u + (e_c - e_u))).pow(2).mean()  # η's sign flipped: the target would be ε0(c)
    assert abs(flipped.item() - terms["erase"].item()) > 1e-3 * erase_.item()
    assert abs((erase_ + retain).item() - terms["total"].item()) > 1e-3 * retain.item()  # weight 1 instead of 0.3
    assert (terms["adv"].item() > 0) == (phase == "adversarial")


# ---- (c) the inner attack -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["pgd", "fast_at"])
def test_inner_attack_lowers_its_loss_and_training_uses_its_tokens(attack: str) -> None:
    eng = _engine(advunlearn_attack=attack, adversarial_steps=30)
    pool = _pool(eng.adapter)
    eng.retain, eng._retain_set = ["a red dog"], {"a red dog"}
    eng.attach()
    try:
        _perturb(eng, std=0.1)  # the model as it is being trained: it no longer equals the original
        from trace_erase.engines.adversarial import AdversarialPrompts

        adv = AdversarialPrompts(eng, CAT, restart=True, signed=attack == "fast_at")
        eng.adversarial = adv
        x, t = pool.trajectories[0].states, torch.tensor([601.0])
        state = eng.gen.get_state()
        start = adv.slots.init_random(eng.gen)  # the random restart the attack will draw
        eng.gen.set_state(state)
        with torch.no_grad():
            before = adv.attack_loss(start, x, t, ["cat"]).item()
        adv.attack(Pool(pool.trajectories[:1]))
        with torch.no_grad():
            after = adv.attack_loss(adv.values["cat"], x, t, ["cat"]).item()
            eng._pool, eng._step = pool, 10
            with adv.slots.active(adv.values["cat"]):
                own = eng.adapter.conditioning([adv.slots.prefixed("cat")]).tensors["encoder_hidden_states"]
            used = adv.encode(["cat"]).tensors["encoder_hidden_states"]
    finally:
        eng.detach()
    assert after < 0.8 * before, (before, after)
    assert adv.losses["cat"] == pytest.approx(after, rel=0.5)
    assert torch.equal(own, used)  # the training branch encodes the attack's own output


# ---- (d) exports --------------------------------------------------------------------------------------------------
def _visible(er) -> None:
    g = torch.Generator().manual_seed(1)
    for k, v in er.state_dict.items():
        if "lora_B" in k:
            er.state_dict[k] = torch.randn(v.shape, generator=g) * 0.05


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def trained(request):
    fam = request.param
    pipe = BUILDERS[fam]()
    er = erase(pipe, ["cat"], method="advunlearn", progress=False, **{**FAST, "steps": 1})
    _visible(er)
    er.apply(pipe)
    ref = _text(pipe)
    remove_erasures(pipe)
    assert all(torch.equal(a, b) for a, b in zip(_text(pipe).values(), _text(BUILDERS[fam]()).values(), strict=True))
    return fam, pipe, er, ref


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    assert max(float((ref[k] - base[k]).abs().max()) for k in ref) > 1e-3  # the erasure changes the encoding
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "full"])
def test_text_encoder_lora_round_trips_through_every_format(trained, tmp_path, fmt) -> None:
    fam, pipe, er, ref = trained
    path = tmp_path / "e.safetensors"
    rec = export_erasure(er, ModelHandle(pipe, get_adapter(pipe), "tiny"), ExportOptions(
        format=fmt, max_rank=None if fmt == "full" else 64), path)
    keys = list(load_file(str(path)))
    fresh = BUILDERS[fam]()
    base = _text(fresh)
    if fmt == "full":
        assert all(k.startswith("text_encoder") and k.endswith(".weight") for k in keys)
        apply_full(fresh, path)
    else:
        heads = {"diffusers": ("text_encoder.text_model.encoder.layers.", "text_encoder_2.text_model.encoder.layers."),
                 "kohya": ("lora_te_text_model_",) if fam == "sd" else ("lora_te1_text_model_", "lora_te2_text_model_")}
        assert {h for k in keys for h in heads[fmt] if k.startswith(h)} == set(heads[fmt][:2 if fam == "sdxl" else 1])
        assert all(v["status"] == "whole" for v in rec["readers"] if v["reader"] in ("diffusers", "comfyui"))
        fresh.load_lora_weights(str(path))
    _close(_text(fresh), ref, base)


def test_merge_writes_the_edited_text_encoder_and_targets_place_every_module(trained, tmp_path) -> None:
    fam, pipe, er, ref = trained
    merged = BUILDERS[fam]()
    er.merge_into(merged)
    merged.save_pretrained(tmp_path / "m")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "m", **null_components(tmp_path / "m"))
    _close(_text(reloaded), ref, _text(BUILDERS[fam]()))
    for target in ("comfyui", "a1111", "forge", "invokeai", "kohya", "diffusers"):
        rec = export_erasure(er, ModelHandle(pipe, get_adapter(pipe), "tiny"),
                             ExportOptions(target=target, strict=True), tmp_path / f"{target}.safetensors")
        assert "companion" not in rec and rec["files"], target


# ---- (e) bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline, extra, message", [
    ("FluxPipeline", [], "'advunlearn' does not support flux \\(it trains CLIP text encoders"),
    ("StableDiffusion3Pipeline", [], "'advunlearn' does not support sd3"),
    ("StableDiffusionPipeline", ["--option", "advunlearn_attack=fgsm"], "unknown advunlearn_attack 'fgsm'"),
    ("StableDiffusionPipeline", ["--option", "advunlearn_retain_weight=-1"], "advunlearn_retain_weight must be ≥ 0"),
    ("StableDiffusionPipeline", ["--option", "window=two"], "drop window"),
    ("StableDiffusionPipeline", ["--concept", "dog", "--multi", "fuse"], "use --multi joint"),
    ("StableDiffusionPipeline", ["--method", "esd-x", "--option", "advunlearn_warmup=5"], "train the text encoder"),
])
def test_bad_input_is_one_line_and_exit_2_before_a_model_loads(tmp_path, capsys, pipeline, extra, message) -> None:
    # a folder with only its model_index.json: loading it would fail with another message, so the refusal is first
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    method = [] if "--method" in extra else ["--method", "advunlearn"]
    code = main(["erase", "--model", str(tmp_path / "m"), "--concept", "cat", *method, *extra,
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()
