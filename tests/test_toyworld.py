"""The toy world: renderer, classifier, trainer (micro), bundled pipelines."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from trace_erase import TraceEraseError
from trace_erase.toyworld.classifier import heldout_accuracy, load_classifier
from trace_erase.toyworld.config import override, preset
from trace_erase.toyworld.render import CLASSES, COLORS, STYLES, SYNONYMS, TEMPLATES, render, vocabulary
from trace_erase.toyworld.train import ToyTrainer


def test_render_is_deterministic_and_consistent() -> None:
    a, b = render(123), render(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.labels == b.labels
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(render(124).image, a.image)
    for seed in range(200):
        s = render(seed)
        names = [s.labels["class"], *SYNONYMS[s.labels["class"]]]
        assert any(n in s.caption for n in names), s.caption
        other = [c for c in CLASSES if c != s.labels["class"]]
        assert not any(f" {c}" in f" {s.caption} " and c not in " ".join(names) for c in other), s.caption
        for color in COLORS:
            if color in s.caption.split():
                assert color == s.labels["color"]
        for style in STYLES[1:]:
            if style in s.caption.split():
                assert style == s.labels["style"]


def test_vocabulary_sizes() -> None:
    assert len(CLASSES) == 10 and all(len(v) == 3 for v in SYNONYMS.values())
    assert len(COLORS) >= 6 and len(STYLES) >= 5 and len(TEMPLATES) >= 8
    assert {"circle", "striped", "red"} <= set(vocabulary())


def test_forced_attributes() -> None:
    s = render(5, cls="star", color="blue", style="dotted", background="black")
    assert (s.labels["class"], s.labels["color"], s.labels["style"]) == ("star", "blue", "dotted")


def test_bundled_classifier_accuracy_on_fresh_renders() -> None:
    acc = heldout_accuracy(load_classifier(), n=600, first_seed=7_000_000)
    assert acc["class"] >= 0.98 and acc["style"] >= 0.98, acc


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_micro_training_runs_and_resumes(family, tmp_path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    cfg = preset(family, micro=True)
    out = ToyTrainer(cfg, tmp_path / "full", progress=False).run()
    assert (out / "model_index.json").is_file() and (out / "trace_erase.json").is_file()
    assert not (tmp_path / "full.partial").exists()
    seconds = json.loads((out / "trace_erase.json").read_text())["training_seconds"]
    assert {"render", "vae", "latents", "denoiser"} <= seconds.keys() and seconds["start_from"] is None
    assert seconds["total"] == pytest.approx(sum(seconds[k] for k in ("render", "vae", "latents", "denoiser")), abs=0.3)
    # interrupted after 5 optimizer steps (inside the denoiser phase), then resumed: same final weights
    first = ToyTrainer(cfg, tmp_path / "resumed", progress=False)
    assert first.run(stop_after=5) is None and first.ckpt_path.exists()
    resumed = ToyTrainer(cfg, tmp_path / "resumed", progress=False).run()
    # the resumed run reports the first call's rendering and VAE time too (it did neither itself)
    assert {"render", "vae"} <= json.loads((resumed / "trace_erase.json").read_text())["training_seconds"].keys()
    a, b = DiffusionPipeline.from_pretrained(out), DiffusionPipeline.from_pretrained(resumed)
    name = "unet" if family == "sd" else "transformer"
    for (k, p), (_, q) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items(),
                              strict=True):
        assert torch.allclose(p, q, atol=1e-6), k


def test_training_refuses_existing_output_and_changed_settings(tmp_path) -> None:
    cfg = preset("sd", micro=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(TraceEraseError, match="already exists"):
        ToyTrainer(cfg, tmp_path / "out")
    ToyTrainer(cfg, tmp_path / "other", progress=False).run(stop_after=2)
    with pytest.raises(TraceEraseError, match="other settings"):
        ToyTrainer(dataclasses.replace(cfg, lr=1.0), tmp_path / "other")


def test_unknown_family() -> None:
    with pytest.raises(TraceEraseError, match="unknown toy family"):
        preset("sd3")


def _weights(folder, name: str) -> dict:
    from diffusers import DiffusionPipeline

    return getattr(DiffusionPipeline.from_pretrained(folder), name).state_dict()


def test_warm_restart_cycles_resume_and_start_from_a_finished_first_cycle(tmp_path) -> None:
    """Two cosine cycles: interrupted exactly at the restart, or started from a pipeline trained with only the
    first cycle, the run ends with the same weights as an uninterrupted one."""
    import torch

    cfg = dataclasses.replace(preset("sd", micro=True), steps=6, cycles=2, checkpoint_every=3)
    full = ToyTrainer(cfg, tmp_path / "full", progress=False).run()
    vae_steps = cfg.vae_steps
    stopped = ToyTrainer(cfg, tmp_path / "stopped", progress=False)
    assert stopped.run(stop_after=vae_steps + 3) is None  # the checkpoint at the cycle boundary
    resumed = ToyTrainer(cfg, tmp_path / "stopped", progress=False).run()
    first = ToyTrainer(dataclasses.replace(cfg, steps=3, cycles=1), tmp_path / "first", progress=False).run()
    started = ToyTrainer(cfg, tmp_path / "started", progress=False, start_from=first).run()
    ref = _weights(full, "unet")
    for other in (resumed, started):
        for k, v in _weights(other, "unet").items():
            assert torch.allclose(ref[k], v, atol=1e-6), k
    assert not torch.allclose(_weights(first, "unet")["conv_in.weight"], ref["conv_in.weight"])
    with pytest.raises(TraceEraseError, match="not trained with the first cycles"):
        ToyTrainer(dataclasses.replace(cfg, lr=1e-3), tmp_path / "x", progress=False, start_from=first).run()
    with pytest.raises(TraceEraseError, match="multiple of cycles"):
        ToyTrainer(dataclasses.replace(cfg, steps=7), tmp_path / "y")
    # a pipeline trained before a setting existed (its sidecar lacks the key) counts as trained with its default
    sidecar = first / "trace_erase.json"
    meta = json.loads(sidecar.read_text())
    del meta["training"]["latent_channels"]
    sidecar.write_text(json.dumps(meta))
    assert ToyTrainer(cfg, tmp_path / "z", progress=False, start_from=first).run(stop_after=1) is None
    with pytest.raises(TraceEraseError, match="latent_channels"):
        ToyTrainer(dataclasses.replace(cfg, latent_channels=8), tmp_path / "w", start_from=first).run()


def test_override_parses_each_field_type() -> None:
    cfg = override(preset("flux"), ["vae_channels=24,48,64", "latent_channels=8", "lr=1e-3", "vae_from=none",
                                    "flux-layers=3,1"])
    assert cfg.vae_channels == (24, 48, 64) and cfg.latent_channels == 8 and cfg.lr == 1e-3
    assert cfg.vae_from is None and cfg.flux_layers == (3, 1) and cfg.family == "flux"
    assert override(cfg, ["vae_from=out/toy-sd"]).vae_from == "out/toy-sd"
    for bad in ("family=sd", "steps=10", "seed=3", "latent", "widths=a,b", "latent_channels=0", "widths=32,0",
                "lr=-1", "lr=nan", "snr_gamma=x"):
        with pytest.raises(TraceEraseError):
            override(cfg, [bad])
    # an optional number is parsed as a number, not kept as the string (its default None says nothing of its type)
    assert override(preset("sd"), ["snr_gamma=5"]).snr_gamma == 5.0
    assert override(preset("sd"), ["snr_gamma=5", "snr_gamma=none"]).snr_gamma is None


def test_min_snr_weighting_trains_sd_and_is_refused_for_flux(tmp_path) -> None:
    with pytest.raises(TraceEraseError, match="snr_gamma"):
        ToyTrainer(override(preset("flux", micro=True), ["snr_gamma=5"]), tmp_path / "flux", progress=False)
    with pytest.raises(TraceEraseError, match="snr_gamma"):
        ToyTrainer(override(preset("sd", micro=True), ["snr_gamma=0"]), tmp_path / "zero", progress=False)
    out = ToyTrainer(override(preset("sd", micro=True), ["snr_gamma=5"]), tmp_path / "sd", progress=False).run()
    assert json.loads((out / "trace_erase.json").read_text())["training"]["snr_gamma"] == 5.0


def test_noise_shift_moves_training_noise_levels_towards_noise(tmp_path) -> None:
    from trace_erase.toyworld.train import shift_noise_levels

    u = torch.linspace(0, 1, 11)
    assert torch.equal(shift_noise_levels(u, 1.0), u)
    shifted = shift_noise_levels(u, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and abs(float(shifted[5]) - 0.75) < 1e-6  # 3·½ / (1 + 2·½)
    assert torch.all(shifted[1:-1] > u[1:-1]) and torch.all(shifted.diff() > 0)  # towards noise, order kept
    assert torch.all(shift_noise_levels(u, 0.5)[1:-1] < u[1:-1])
    # the default leaves a recipe's key (and so its resumable runs) unchanged; a shift is a new recipe
    assert override(preset("sd"), ["noise_shift=1"]).key() == preset("sd").key()
    assert override(preset("sd"), ["noise_shift=3"]).key() != preset("sd").key()
    with pytest.raises(TraceEraseError, match="noise_shift"):
        ToyTrainer(override(preset("sd", micro=True), ["noise_shift=0"]), tmp_path / "zero", progress=False)
    out = ToyTrainer(override(preset("sd", micro=True), ["noise_shift=3"]), tmp_path / "sd", progress=False).run()
    assert json.loads((out / "trace_erase.json").read_text())["training"]["noise_shift"] == 3.0


def test_zero_terminal_snr_schedule_trains_a_v_prediction_toy_sd(tmp_path) -> None:
    """The v-zero-snr recipe gives a pipeline whose scheduler ends at pure noise and predicts v; the trainer's target
    is v there (at the last step, where ᾱ = 0, v = −x0, the picture itself: the caption must say where it goes)."""
    for bad, says in ((["noise_schedule=v"], "noise_schedule 'v'"), (["noise_schedule=v-zero-snr", "snr_gamma=5"],
                                                                   "snr_gamma")):
        with pytest.raises(TraceEraseError, match=says):
            ToyTrainer(override(preset("sd", micro=True), bad), tmp_path / "bad", progress=False)
    with pytest.raises(TraceEraseError, match="noise_schedule"):
        ToyTrainer(override(preset("flux", micro=True), ["noise_schedule=v-zero-snr"]), tmp_path / "f", progress=False)
    out = ToyTrainer(override(preset("sd", micro=True), ["noise_schedule=v-zero-snr"]), tmp_path / "sd",
                     progress=False).run()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True
    from diffusers import DDIMScheduler

    assert float(DDIMScheduler.from_pretrained(out / "scheduler").alphas_cumprod[-1]) == 0.0
    assert override(preset("sd"), ["noise_schedule=epsilon"]).key() == preset("sd").key()
