"""The scene pipelines (toy-sd-scenes, toy-flux-scenes): recipe, vocabulary extension, micro fine-tune, 64×32
sampling, the check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from trace_erase.cli import main
from trace_erase.errors import TraceEraseError
from trace_erase.toyworld.config import SCENE_HELDOUT_PAIRS, check_recipe, override, preset
from trace_erase.toyworld.scene_check import require_scene_model, scene_prompts, score_scenes
from trace_erase.toyworld.scenes.captions import parse_caption, vocabulary
from trace_erase.toyworld.scenes.data import render_scenes, scene_from_labels
from trace_erase.toyworld.scenes.render import Scene, SlotObject, render_scene
from trace_erase.toyworld.train import ToyTrainer


def test_scene_preset_sizes_and_refusals() -> None:
    from trace_erase.toyworld.components import latent_size

    cfg = preset("sd", scenes=True)
    assert (cfg.world, cfg.height_width, cfg.name) == ("scenes", (32, 64), "toy-sd-scenes")
    assert (cfg.init_from, cfg.vae_from, cfg.cycles) == ("toy-sd", "toy-sd", 1)
    assert latent_size(cfg) == (16, 32) and latent_size(preset("sd")) == 16
    assert preset("sd", micro=True, scenes=True).height_width == (32, 64)
    # the single-object recipes hash as before the scene fields existed: their partial runs still resume
    assert preset("sd").key() == "afbf2f88dfa21172" and preset("flux", micro=True).key() == "627db3ea8a63def2"
    assert preset("sd").key() != cfg.key()
    assert cfg.key() == "500244dfa23c72c9"  # toy-sd-scenes' partial run resumes across the flux recipe's changes
    with pytest.raises(TraceEraseError, match="32 high × 64 wide"):
        check_recipe(override(cfg, ["image_width=32"]))
    with pytest.raises(TraceEraseError, match="square"):
        check_recipe(override(preset("sd"), ["image_width=64"]))
    with pytest.raises(TraceEraseError, match="init_from needs vae_from"):
        check_recipe(override(cfg, ["vae_from=none"]))
    with pytest.raises(TraceEraseError, match="unknown world"):
        check_recipe(override(cfg, ["world=rooms"]))


def test_extended_tokenizer_keeps_every_old_id_and_spells_scene_words_whole() -> None:
    from transformers import CLIPTokenizer

    from trace_erase.models.loading import BUNDLED_DIR
    from trace_erase.models.tokenizers import extend_clip_tokenizer
    from trace_erase.toyworld.components import toy_words

    old = CLIPTokenizer.from_pretrained(BUNDLED_DIR / "toy-sd" / "tokenizer")
    new = extend_clip_tokenizer(old, vocabulary())
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[k] == v for k, v in old_vocab.items()) and len(new) > len(old)
    assert min(v for k, v in new_vocab.items() if k not in old_vocab) == len(old)  # appended
    for w in toy_words():
        assert new(w).input_ids == old(w).input_ids, w
    for w in vocabulary():
        assert len(new(w, add_special_tokens=False).input_ids) == 1, w
    assert new.model_max_length == old.model_max_length
    longest = "a red plain plus sign on the left and a blue checkered half moon on the right, on a black background"
    assert len(new(longest).input_ids) <= new.model_max_length  # the longest caption form fits, untruncated


def test_scene_training_set_holds_out_the_check_pairs() -> None:
    data = render_scenes(20_000_000, 300, skip_pairs=SCENE_HELDOUT_PAIRS, progress=False)
    assert data.images.shape == (300, 32, 64, 3)
    scenes = [scene_from_labels(lb) for lb in data.labels]
    assert not any(s.left and s.right and (s.left.cls, s.right.cls) in SCENE_HELDOUT_PAIRS for s in scenes)
    assert np.array_equal(data.images[7], render_scene(scenes[7], data.seeds[7]))
    prompts = scene_prompts(40)
    for key in ("pairs", "color"):
        assert all((e["left"], e["right"]) in SCENE_HELDOUT_PAIRS for _, e in prompts[key])


def _scene_of(expect: dict) -> Scene:
    def obj(side: str) -> SlotObject | None:
        cls = expect.get(side)
        return None if cls is None else SlotObject(cls, expect.get(f"{side}_color", "red"), "plain")

    return Scene(obj("left"), obj("right"), "gray")


def test_check_prompts_state_their_expectation_and_renders_pass_the_bars() -> None:
    """Each check prompt parses to a scene its expectation describes, and renders of those scenes meet every bar
    under the bundled scorer (so a failing model fails, not the check)."""
    from trace_erase.toyworld.scene_check import BARS
    from trace_erase.toyworld.scenes.scorer import load_scene_scorer

    prompts = scene_prompts(30)
    scorer = load_scene_scorer()
    preds = {}
    for key, items in prompts.items():
        scenes = [_scene_of(e) for _, e in items]
        assert all(parse_caption(p).consistent_with(s) for (p, _), s in zip(items, scenes, strict=True))
        preds[key] = scorer.predict_labels(np.stack([render_scene(s, 8_000_000 + i) for i, s in enumerate(scenes)]))
    figures = score_scenes(prompts, preds)
    assert all(figures[k] >= bar for k, bar in BARS.items()), figures
    # a model that swaps sides keeps the classes but loses the sides
    swapped = {**preds, "pairs": [{**p, "left": p["right"], "right": p["left"]} for p in preds["pairs"]]}
    assert score_scenes(prompts, swapped)["side"] == 0.0 and score_scenes(prompts, swapped)["class"] >= 0.9


def _assert_new_rows_are_full_size(encoder, n_old: int) -> None:
    """The new words' rows have the old rows' median norm and point in different directions: with rows a tenth of a
    trained word's size, 'left' and 'right' reach the denoiser nearly identical and are never learned."""
    weight = encoder.get_input_embeddings().weight.detach()
    old, new = weight[:n_old].norm(dim=1).median(), weight[n_old:]
    assert len(new) >= 2 and torch.allclose(new.norm(dim=1), old.expand(len(new)), rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(new[:, None], new[None], dim=-1) - torch.eye(len(new))
    assert cos.abs().max() < 0.9


@pytest.fixture(scope="module")
def micro_scenes(tmp_path_factory) -> tuple:
    """A micro single-object toy-sd, and a micro scene pipeline fine-tuned from it (seconds)."""
    root = tmp_path_factory.mktemp("scenes")
    base = ToyTrainer(preset("sd", micro=True), root / "objects", progress=False).run()
    cfg = dataclasses.replace(preset("sd", micro=True, scenes=True), init_from=str(base), vae_from=str(base))
    return base, ToyTrainer(cfg, root / "scenes", progress=False).run()


def test_micro_scene_fine_tune_extends_the_text_encoder_and_starts_from_the_unet(micro_scenes) -> None:
    from diffusers import DiffusionPipeline

    base, scenes = micro_scenes
    a, b = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(scenes)
    old_vocab, new_vocab = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    assert all(new_vocab[k] == v for k, v in old_vocab.items()) and "left</w>" in new_vocab
    emb_a = a.text_encoder.get_input_embeddings().weight
    emb_b = b.text_encoder.get_input_embeddings().weight
    assert emb_b.shape[0] == len(b.tokenizer) > emb_a.shape[0] == len(a.tokenizer)
    assert b.text_encoder.config.vocab_size == len(b.tokenizer)
    assert list(b.unet.config.sample_size) == [16, 32]
    assert all(torch.equal(p, q) for p, q in zip(a.vae.state_dict().values(), b.vae.state_dict().values(),
                                                   strict=True))  # the VAE is reused as is
    meta = json.loads((scenes / "trace_erase.json").read_text())
    assert meta["sampler"]["height"] == 32 and meta["sampler"]["width"] == 64 and "resolution" not in meta["sampler"]
    assert meta["training"]["world"] == "scenes" and meta["training_seconds"]["denoiser"] > 0


def test_micro_scene_fine_tune_starts_from_the_old_weights(tmp_path) -> None:
    """Before any step (the checkpoint written at start) the old token rows and the UNet are the init's."""
    from diffusers import DiffusionPipeline

    from trace_erase.toyworld.components import build_components

    base = ToyTrainer(preset("sd", micro=True), tmp_path / "objects", progress=False).run()
    cfg = dataclasses.replace(preset("sd", micro=True, scenes=True), init_from=str(base), vae_from=str(base))
    parts, ref = build_components(cfg), DiffusionPipeline.from_pretrained(base)
    old = ref.text_encoder.get_input_embeddings().weight
    assert torch.equal(parts["text_encoder"].get_input_embeddings().weight[: len(old)], old)
    _assert_new_rows_are_full_size(parts["text_encoder"], len(old))
    for (k, p), (_, q) in zip(parts["unet"].state_dict().items(), ref.unet.state_dict().items(), strict=True):
        assert torch.equal(p, q), k
    with pytest.raises(TraceEraseError, match="other sizes"):
        build_components(dataclasses.replace(cfg, text_width=32))


def test_text_only_start_keeps_the_text_side_and_builds_a_fresh_deeper_unet(micro_scenes) -> None:
    """``init_parts=text``: the trained text encoder (old rows unchanged, new rows added) with a fresh UNet of the
    recipe's own sizes — here one level deeper than the start, which ``init_parts=all`` refuses."""
    from diffusers import DiffusionPipeline

    from trace_erase.toyworld.components import build_components

    base = micro_scenes[0]
    cfg = dataclasses.replace(preset("sd", micro=True, scenes=True), init_from=str(base), vae_from=str(base),
                              init_parts="text", widths=(16, 16, 16, 16))
    parts, ref = build_components(cfg), DiffusionPipeline.from_pretrained(base)
    old = ref.text_encoder.get_input_embeddings().weight
    assert torch.equal(parts["text_encoder"].get_input_embeddings().weight[: len(old)], old)
    assert len(parts["tokenizer"]) > len(ref.tokenizer)
    assert len(parts["unet"].down_blocks) == 4 and len(ref.unet.down_blocks) == 3
    with pytest.raises(TraceEraseError, match="other sizes"):
        build_components(dataclasses.replace(cfg, init_parts="all"))
    with pytest.raises(TraceEraseError, match="set init_from as well"):
        check_recipe(dataclasses.replace(cfg, init_from=None))
    with pytest.raises(TraceEraseError, match="not one of all, text"):
        check_recipe(dataclasses.replace(cfg, init_parts="unet"))


def test_micro_scene_fine_tune_resumes_to_the_same_weights(micro_scenes, tmp_path) -> None:
    """Interrupted inside the denoiser phase and rerun, the fine-tune ends where the uninterrupted one did."""
    from diffusers import DiffusionPipeline

    base, full = micro_scenes
    cfg = dataclasses.replace(preset("sd", micro=True, scenes=True), init_from=str(base), vae_from=str(base))
    first = ToyTrainer(cfg, tmp_path / "resumed", progress=False)
    assert first.run(stop_after=3) is None and first.ckpt_path.exists()
    resumed = ToyTrainer(cfg, tmp_path / "resumed", progress=False).run()
    a, b = DiffusionPipeline.from_pretrained(full), DiffusionPipeline.from_pretrained(resumed)
    for name in ("unet", "text_encoder"):
        for (k, p), (_, q) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items(),
                                  strict=True):
            assert torch.allclose(p, q, atol=1e-6), (name, k)


def test_micro_scene_pipeline_samples_64x32_through_the_library(micro_scenes) -> None:
    from trace_erase import load_model
    from trace_erase.sampling import generate_images, sampler_settings
    from trace_erase.toyworld.scene_check import scene_quality_check

    handle = load_model(str(micro_scenes[1]))
    settings = sampler_settings(handle)
    assert (settings["height"], settings["width"], settings["resolution"]) == (32, 64, "64x32")
    assert handle.adapter.latent_shape(2) == (2, 4, 16, 32)
    images = generate_images(handle, ["a star on the left", ""], [0, 1], progress=False)
    assert [im.size for im in images] == [(64, 32), (64, 32)]
    res = scene_quality_check(handle, seeds=2, progress=False)
    assert set(res["figures"]) == {"class", "side", "color", "empty", "single_side"}
    assert all(0.0 <= v <= 1.0 for v in res["figures"].values())


def test_scene_check_refuses_a_single_object_model_before_loading(capsys, monkeypatch) -> None:
    import trace_erase.models as models

    def no_load(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(TraceEraseError, match="not a scene model"):
        require_scene_model("toy-sd")
    assert main(["toyworld", "check", "--model", "toy-sd", "--scenes"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a scene model" in err and len(err.splitlines()) == 1
    assert main(["toyworld", "check", "--model", "toy-sd", "--scenes", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


# ---- toy-flux-scenes ---------------------------------------------------------------------------------------------
def test_flux_scene_preset_sizes_and_square_keys() -> None:
    cfg = preset("flux", scenes=True)
    assert (cfg.world, cfg.height_width, cfg.name) == ("scenes", (32, 64), "toy-flux-scenes")
    assert (cfg.init_from, cfg.vae_from) == ("toy-flux", "toy-sd")  # toy-flux's own VAE is toy-sd's
    assert (cfg.steps, cfg.cycles, cfg.lr, cfg.checkpoint_every, cfg.n_images) == (3500, 1, 4e-4, 250, 20000)
    assert (cfg.sampler_steps, cfg.sampler_guidance) == (20, 4.0)  # toy-flux's sampler
    check_recipe(cfg)
    assert preset("flux", micro=True, scenes=True).height_width == (32, 64)
    # the square FLUX recipes hash as before: their partial runs (and --start-from) still resume
    assert preset("flux").key() == "e27b32fa88847c9c" and preset("flux", micro=True).key() == "627db3ea8a63def2"
    assert cfg.key() not in (preset("flux").key(), preset("sd", scenes=True).key())


def test_extended_t5_tokenizer_keeps_every_old_id_and_spells_scene_words_whole() -> None:
    from transformers import CLIPTokenizer, T5Tokenizer

    from trace_erase.models.loading import BUNDLED_DIR
    from trace_erase.models.tokenizers import extend_clip_tokenizer, extend_t5_tokenizer
    from trace_erase.toyworld.components import toy_words

    longest = "a red plain plus sign on the left and a blue checkered half moon on the right, on a black background"
    for folder, extend, cls in (("tokenizer_2", extend_t5_tokenizer, T5Tokenizer),
                                ("tokenizer", extend_clip_tokenizer, CLIPTokenizer)):
        old = cls.from_pretrained(BUNDLED_DIR / "toy-flux" / folder)
        new = extend(old, toy_words("scenes"))
        old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
        assert all(new_vocab[k] == v for k, v in old_vocab.items()) and len(new) > len(old), folder
        assert min(v for k, v in new_vocab.items() if k not in old_vocab) == len(old)  # appended
        for w in toy_words():
            assert new(w).input_ids == old(w).input_ids, (folder, w)
        for w in vocabulary():
            assert len(new(w, add_special_tokens=False).input_ids) == 1, (folder, w)
        assert new.model_max_length == old.model_max_length
        assert len(new(longest).input_ids) <= new.model_max_length, folder
        assert (new.pad_token_id, new.eos_token_id) == (old.pad_token_id, old.eos_token_id)


def _flux_scene_cfg(base) -> object:
    return dataclasses.replace(preset("flux", micro=True, scenes=True), init_from=str(base), vae_from=str(base))


@pytest.fixture(scope="module")
def micro_flux_scenes(tmp_path_factory) -> tuple:
    """A micro single-object toy-flux, and a micro toy-flux-scenes fine-tuned from it (seconds)."""
    root = tmp_path_factory.mktemp("flux_scenes")
    base = ToyTrainer(preset("flux", micro=True), root / "objects", progress=False).run()
    return base, ToyTrainer(_flux_scene_cfg(base), root / "scenes", progress=False).run()


def test_micro_flux_scene_fine_tune_extends_both_text_encoders(micro_flux_scenes) -> None:
    from diffusers import DiffusionPipeline

    base, scenes = micro_flux_scenes
    a, b = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(scenes)
    assert type(b).__name__ == "FluxPipeline"
    for tok, enc, word in (("tokenizer", "text_encoder", "left</w>"), ("tokenizer_2", "text_encoder_2", "▁left")):
        old_vocab, new_vocab = getattr(a, tok).get_vocab(), getattr(b, tok).get_vocab()
        assert all(new_vocab[k] == v for k, v in old_vocab.items()) and word in new_vocab, tok
        rows_a = getattr(a, enc).get_input_embeddings().weight.shape[0]
        rows_b = getattr(b, enc).get_input_embeddings().weight.shape[0]
        assert rows_b == len(getattr(b, tok)) > rows_a == len(getattr(a, tok)), enc
        assert getattr(b, enc).config.vocab_size == len(getattr(b, tok)), enc
    same = ("_name_or_path",)  # the folder it was loaded from differs, nothing else
    assert {k: v for k, v in b.transformer.config.items() if k not in same} == {
        k: v for k, v in a.transformer.config.items() if k not in same}
    assert all(torch.equal(p, q) for p, q in zip(a.vae.state_dict().values(), b.vae.state_dict().values(),
                                                   strict=True))  # the VAE is reused as is
    meta = json.loads((scenes / "trace_erase.json").read_text())
    assert meta["sampler"]["height"] == 32 and meta["sampler"]["width"] == 64 and "resolution" not in meta["sampler"]
    assert (meta["sampler"]["steps"], meta["sampler"]["guidance"]) == (2, 4.0)
    assert meta["training"]["world"] == "scenes" and meta["training"]["family"] == "flux"
    assert meta["training_seconds"]["denoiser"] > 0


def test_micro_flux_scene_fine_tune_starts_from_the_old_weights(micro_flux_scenes) -> None:
    """The components the fine-tune starts from: both encoders' old token rows and the whole transformer are the
    init's; a start of other sizes is refused."""
    from diffusers import DiffusionPipeline

    from trace_erase.toyworld.components import build_components

    base = micro_flux_scenes[0]
    cfg = _flux_scene_cfg(base)
    parts, ref = build_components(cfg), DiffusionPipeline.from_pretrained(base)
    for enc in ("text_encoder", "text_encoder_2"):
        old = getattr(ref, enc).get_input_embeddings().weight
        assert torch.equal(parts[enc].get_input_embeddings().weight[: len(old)], old), enc
        _assert_new_rows_are_full_size(parts[enc], len(old))
    for (k, p), (_, q) in zip(parts["transformer"].state_dict().items(), ref.transformer.state_dict().items(),
                              strict=True):
        assert torch.equal(p, q), k
    with pytest.raises(TraceEraseError, match="other sizes"):
        build_components(dataclasses.replace(cfg, flux_heads=4))


def test_micro_flux_scene_fine_tune_resumes_to_the_same_weights(micro_flux_scenes, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    base, full = micro_flux_scenes
    first = ToyTrainer(_flux_scene_cfg(base), tmp_path / "resumed", progress=False)
    assert first.run(stop_after=3) is None and first.ckpt_path.exists()
    resumed = ToyTrainer(_flux_scene_cfg(base), tmp_path / "resumed", progress=False).run()
    a, b = DiffusionPipeline.from_pretrained(full), DiffusionPipeline.from_pretrained(resumed)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        for (k, p), (_, q) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items(),
                                  strict=True):
            assert torch.allclose(p, q, atol=1e-6), (name, k)


def test_micro_flux_scene_pipeline_samples_64x32_alike_through_the_pipeline_and_the_library(micro_flux_scenes) -> None:
    """``generate_images`` (FluxPipeline's own __call__) and the library's denoise loop (stage B's replay pool, the
    attacks' references) draw the same 64 × 32 latents from the same seeds: 8 × 16 packed 2×2 patches."""
    from trace_erase import load_model
    from trace_erase.models.denoise import denoise
    from trace_erase.sampling import generate_images, sampler_settings

    handle = load_model(str(micro_flux_scenes[1]))
    adapter = handle.adapter
    settings = sampler_settings(handle)
    assert (settings["height"], settings["width"], settings["resolution"]) == (32, 64, "64x32")
    assert adapter.latent_shape(2) == (2, 4, 16, 32)
    prompts, seeds = ["a star on the left and a house on the right", ""], [0, 1]
    packed = torch.stack(generate_images(handle, prompts, seeds, progress=False, output_type="latent"))
    noise = torch.stack([torch.randn(adapter.latent_shape(1)[1:], generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    scheduler = adapter.rollout_scheduler(settings["steps"])
    final = denoise(adapter, scheduler, adapter.initial_noise(scheduler, noise), adapter.conditioning(prompts),
                    adapter.conditioning([""] * len(prompts)), settings["guidance"])
    ours = adapter.pipeline_latents(final)
    assert packed.shape == ours.shape == (2, 8 * 16, 16)
    assert packed.abs().max() > 0.1
    assert (packed - ours).abs().max() <= 1e-4, float((packed - ours).abs().max())
    images = generate_images(handle, prompts, seeds, progress=False)
    assert [im.size for im in images] == [(64, 32), (64, 32)]


def test_scene_check_runs_on_a_flux_scene_model_with_its_bars(micro_flux_scenes, tmp_path, capsys) -> None:
    from trace_erase.toyworld.scene_check import BARS

    out = tmp_path / "check.json"
    assert main(["toyworld", "check", "--model", str(micro_flux_scenes[1]), "--seeds", "1",
                 "--output", str(out)]) == 0
    assert "scene scorer" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["bars"] == {**BARS, "class": 0.80}
    assert set(res["passed"]) == set(BARS) and res["sampler"]["resolution"] == "64x32"
    assert res["training"]["family"] == "flux" and res["training"]["world"] == "scenes"
