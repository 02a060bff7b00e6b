"""The scene toy world: two-slot renderer, captions and their parser, the per-slot scorer, scene-erasure metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trace_erase.errors import TraceEraseError
from trace_erase.evaluation.scene_metrics import (
    acc_e,
    h_scene,
    layout,
    retention,
    retention_per_head,
    scene_metrics,
    slot_drift,
    target_outcome,
)
from trace_erase.toyworld.render import BACKGROUNDS, render
from trace_erase.toyworld.render import vocabulary as object_vocabulary
from trace_erase.toyworld.scenes.captions import (
    ParsedObject,
    all_captions,
    caption_for,
    parse_caption,
    read_caption_file,
    vocabulary,
)
from trace_erase.toyworld.scenes.render import (
    Scene,
    SlotObject,
    centroid,
    random_scene,
    render_scene,
    render_scene_sample,
    silhouette,
    slot_mask,
    slot_seed,
)

STAR = SlotObject("star", "red", "striped")
HOUSE = SlotObject("house", "blue", "plain")


def mirrored(scene: Scene) -> Scene:
    return Scene(scene.right, scene.left, scene.background)


# --- renderer -------------------------------------------------------------------------------------------------------

def test_render_is_deterministic_by_seed_and_reuses_the_slot_renderer() -> None:
    scene = Scene(STAR, HOUSE, "black")
    a = render_scene(scene, 7)
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_scene(scene, 7))
    assert not np.array_equal(a, render_scene(scene, 8))
    assert np.array_equal(a[:, :32], render(slot_seed(7, "left"), cls="star", color="red", style="striped",
                                            background="black").image)
    assert np.array_equal(a[:, 32:], render(slot_seed(7, "right"), cls="house", color="blue", style="plain",
                                            background="black").image)
    assert random_scene(3) == random_scene(3) and any(random_scene(3) != random_scene(s) for s in range(4, 8))


def test_empty_slot_is_flat_background_and_masks_follow_the_side() -> None:
    img = render_scene(Scene(STAR, None, "gray"), 11)
    assert (img[:, 32:] == BACKGROUNDS["gray"]).all() and not (img[:, :32] == BACKGROUNDS["gray"]).all()
    assert slot_mask(img, "left").sum() > 50 and slot_mask(img, "right").sum() == 0
    assert np.array_equal(slot_mask(img, "left"), slot_mask(img, "left", background="gray"))
    img2 = render_scene(Scene(None, STAR, "gray"), 11)
    assert slot_mask(img2, "left").sum() == 0 and slot_mask(img2, "right").sum() > 50


def test_mask_centroid_matches_the_render_geometry() -> None:
    for seed in range(5):
        s = render_scene_sample(Scene(SlotObject("square", "green", "plain"), SlotObject("circle", "red", "plain"),
                                      "white"), seed)
        for side in ("left", "right"):
            cx, cy = centroid(slot_mask(s.image, side))
            ex, ey = (c * 32 - 0.5 for c in s.slot_labels[side]["center"])
            assert abs(cx - ex) < 0.6 and abs(cy - ey) < 0.6, (side, cx, cy, ex, ey)


def test_silhouette_fills_holes_and_centroid_by_hand() -> None:
    ring = np.zeros((32, 32), bool)
    ring[4:10, 20:28] = True
    ring[6:8, 22:26] = False
    sil = silhouette(ring)
    assert sil.sum() == 48 and ring.sum() == 40 and sil[6, 22]
    assert centroid(sil) == (23.5, 6.5) and centroid(np.zeros((32, 32), bool)) is None


def test_unknown_names_in_a_scene_are_one_line_errors() -> None:
    with pytest.raises(TraceEraseError, match="unknown class 'spoon'"):
        SlotObject("spoon", "red", "plain")
    with pytest.raises(TraceEraseError, match="unknown background"):
        Scene(STAR, None, "pink")


# --- captions -------------------------------------------------------------------------------------------------------

def test_the_documented_caption_parses_per_side() -> None:
    p = parse_caption("a red striped star on the left and a blue house on the right, on a black background")
    assert p.sides == {"left": ParsedObject("star", "red", "striped"), "right": ParsedObject("house", "blue", None)}
    assert p.background == "black" and p.unplaced == ()
    q = parse_caption("a blue hut on the right and a red striped pentagram on the left")
    assert q.sides == {"right": ParsedObject("house", "blue", None), "left": ParsedObject("star", "red", "striped")}
    scene = Scene(STAR, HOUSE, "black")
    assert p.consistent_with(scene) and q.consistent_with(scene)
    assert not p.consistent_with(mirrored(scene)) and not q.consistent_with(mirrored(scene))
    assert not p.consistent_with(Scene(STAR, HOUSE, "white"))


def test_partial_and_single_captions() -> None:
    p = parse_caption("a star and a house")
    assert p.sides == {} and set(p.unplaced) == {ParsedObject("star"), ParsedObject("house")}
    assert p.consistent_with(Scene(STAR, HOUSE, "black")) and p.consistent_with(Scene(HOUSE, STAR, "beige"))
    assert not p.consistent_with(Scene(STAR, STAR, "black"))
    one = parse_caption("a star on the left and nothing on the right")
    assert one.sides == {"left": ParsedObject("star"), "right": None}
    assert one.consistent_with(Scene(STAR, None, "gray")) and not one.consistent_with(Scene(STAR, HOUSE, "gray"))
    assert not one.consistent_with(Scene(None, STAR, "gray"))
    assert parse_caption("a plus sign on the right").sides == {"right": ParsedObject("cross")}
    assert parse_caption("an empty picture, on a gray background").sides == {"left": None, "right": None}


def test_every_generated_caption_parses_back_to_its_scene() -> None:
    n = 0
    for seed in range(400):
        scene = random_scene(seed, p_empty=0.3)
        caps = all_captions(scene)
        assert parse_caption(caption_for(scene, seed)).consistent_with(scene)
        for cap in caps:
            p = parse_caption(cap)
            assert p.consistent_with(scene), (cap, scene)
            classes = [o.cls if o else None for o in (scene.left, scene.right)]
            if p.sides and classes[0] != classes[1]:  # a side-stated caption must not fit the mirrored scene
                assert not p.consistent_with(mirrored(scene)), (cap, scene)
            n += 1
    assert n > 5000
    full = all_captions(Scene(STAR, HOUSE, "black"))
    assert "a red striped star on the left and a blue house on the right, on a black background" in full
    assert "a blue house on the right and a red striped star on the left, on a black background" in full
    assert "a star and a house" in full and "a house and a star" in full
    assert "a star on the left" in all_captions(Scene(STAR, None, "black"))
    assert any("pentagram" in c for c in full) and any("hut" in c for c in full)


def test_bad_captions_and_caption_files_raise_one_line(tmp_path) -> None:
    for text, word in (("a spoon on the left", "unknown class 'spoon'"), ("a star in the middle", "unknown side"),
                       ("a red star on the top and a house", "unknown side 'top'"),
                       ("a star on the left, on a pink background", "unknown background")):
        with pytest.raises(TraceEraseError, match=word) as err:
            parse_caption(text)
        assert "\n" not in str(err.value)
    path = tmp_path / "captions.txt"
    path.write_text("# scenes\na star on the left and a house on the right\n\na blue spoon on the right\n")
    with pytest.raises(TraceEraseError, match=r"captions.txt:4: unknown class 'spoon'.*synonyms"):
        read_caption_file(path)
    path.write_text("a star on the left\na house\n")
    assert [p.sides for p in read_caption_file(path)] == [{"left": ParsedObject("star")}, {}]


def test_vocabulary_covers_every_caption_word() -> None:
    vocab = set(vocabulary())
    assert set(object_vocabulary()) <= vocab and {"left", "right", "nothing", "and", "empty"} <= vocab
    for seed in range(50):
        for cap in all_captions(random_scene(seed, p_empty=0.3)):
            assert set(cap.replace(",", "").split()) <= vocab, cap


# --- scorer ---------------------------------------------------------------------------------------------------------

def test_bundled_scene_scorer_on_fresh_renders() -> None:
    from trace_erase.toyworld.scenes.scorer import heldout_accuracy, load_scene_scorer

    acc = heldout_accuracy(load_scene_scorer(), n=100, first_seed=8_000_000)  # training seeds: 10⁶ .. 10⁶+12000
    assert set(acc) == {"class", "color", "style", "background"} and min(acc.values()) >= 0.98, acc


def test_scene_scorer_slot_order_and_refusals(tmp_path) -> None:
    from trace_erase.toyworld.classifier import CLASSIFIER_DIR
    from trace_erase.toyworld.scenes.scorer import load_scene_scorer

    model = load_scene_scorer()
    img = np.stack([render_scene(Scene(STAR, None, "black"), 1), render_scene(Scene(None, STAR, "white"), 1)])
    left, right = model.predict_labels(img)
    assert left["left"] == {"class": "star", "color": "red", "style": "striped"} and left["background"] == "black"
    assert right["left"] == {"class": "empty", "color": None, "style": None} and right["right"]["class"] == "star"
    with pytest.raises(TraceEraseError, match="without per-slot heads"):
        load_scene_scorer(CLASSIFIER_DIR)
    with pytest.raises(TraceEraseError, match="no scene scorer"):
        load_scene_scorer(tmp_path)


# --- metrics --------------------------------------------------------------------------------------------------------

def slot(cls: str, color: str | None = None, style: str | None = None) -> dict:
    return {"class": cls, "color": color, "style": style}


E = slot("empty")
SIDES4 = ["left", "right", "left", "right"]  # target side per picture
BASE = [{"left": slot("star", "red", "plain"), "right": slot("house", "blue", "plain"), "background": "black"},
        {"left": slot("heart", "green", "dotted"), "right": slot("star", "red", "plain"), "background": "black"},
        {"left": slot("star", "red", "plain"), "right": slot("arrow", "orange", "striped"), "background": "white"},
        {"left": slot("cross", "purple", "outlined"), "right": slot("star", "red", "plain"), "background": "gray"}]
ERASED = [{"left": E, "right": slot("house", "blue", "plain"), "background": "black"},  # erased, kept
          {"left": slot("heart", "blue", "dotted"), "right": slot("star", "red", "plain"), "background": "black"},
          {"left": slot("heart", "red", "plain"), "right": slot("arrow", "orange", "striped"), "background": "white"},
          {"left": E, "right": E, "background": "gray"}]  # both gone


def test_prediction_metrics_by_hand() -> None:
    assert acc_e(ERASED, "star", SIDES4) == 0.25 and acc_e(BASE, "star", SIDES4) == 1.0
    assert acc_e(ERASED, "star", ["right", "left", "right", "left"]) == 0.0  # sides swapped: other slots
    assert target_outcome(ERASED, "star", SIDES4) == {"target": 0.25, "empty": 0.5, "other": 0.25}
    assert retention_per_head(BASE, ERASED, SIDES4) == {"class": 0.75, "color": 0.5, "style": 0.75, "all": 0.5}
    assert retention(BASE, ERASED, SIDES4) == 0.5
    assert retention(BASE, ERASED, ["right", "left", "right", "left"]) == 0.25  # the target slots: only #1 kept
    assert h_scene(0.25, 0.5) == pytest.approx(0.6)  # 2 / (1/0.75 + 1/0.5)
    assert h_scene(1.0, 0.9) == 0.0 and h_scene(0.0, 0.0) == 0.0 and h_scene(0.0, 1.0) == 1.0
    with pytest.raises(TraceEraseError, match="target sides"):
        acc_e(ERASED, "star", ["left"])
    with pytest.raises(TraceEraseError, match="unknown target side"):
        retention(BASE, ERASED, "middle")


def flat(bg: tuple[int, int, int] = (45, 45, 45)) -> np.ndarray:
    img = np.empty((32, 64, 3), np.uint8)
    img[:] = bg
    return img


def test_layout_and_slot_drift_by_hand() -> None:
    base, erased = flat(), flat()
    base[10:14, 40:44] = 245  # a 4×4 white square in the right slot (columns 8..11 of the slot)
    erased[10:14, 42:46] = 245  # shifted 2 px to the right
    erased[:, :32] = (200, 0, 0)  # the target (left) slot repainted, with a 2×2 white patch: must not count
    erased[0:2, 0:2] = 245
    out = layout(base[None], erased[None], "left")
    assert out["iou"] == pytest.approx(8 / 24) and out["centroid_shift"] == pytest.approx(2.0)
    assert out["vanished"] == 0.0
    swapped = layout(base[None], erased[None], "right")  # the left slot: nothing in the base, a patch when erased
    assert swapped["iou"] == 0.0 and swapped["vanished"] == 0.0 and math.isnan(swapped["centroid_shift"])
    drift = slot_drift(base[None], erased[None], "left")
    assert drift["l2"] == pytest.approx(16 / 1024 * math.sqrt(3) * 200 / 255)
    assert 0 < drift["ssim"] < 1
    d_red, d_white = math.sqrt(155**2 + 2 * 45**2) / 255, math.sqrt(3) * 200 / 255
    assert slot_drift(base[None], erased[None], "right")["l2"] == pytest.approx((1020 * d_red + 4 * d_white) / 1024)
    gray, black = flat(BACKGROUNDS["gray"]), flat((0, 0, 0))
    a = 185 / 255  # SSIM of two flat images: (2ab + c1) / (a² + b² + c1) with b = 0
    assert slot_drift(gray[None], black[None], "right")["ssim"] == pytest.approx(1e-4 / (a * a + 1e-4))
    assert slot_drift(gray[None], black[None], "right")["l2"] == pytest.approx(math.sqrt(3) * a)


def test_an_erasure_that_blanks_the_picture() -> None:
    scenes = [Scene(STAR, HOUSE, "black"), Scene(HOUSE, STAR, "beige"), Scene(STAR, SlotObject("arrow", "green",
                                                                                                "dotted"), "gray")]
    sides = ["left", "right", "left"]
    base_img = np.stack([render_scene(s, k) for k, s in enumerate(scenes)])
    base = [{side: slot(o.cls, o.color, o.style) for side, o in (("left", s.left), ("right", s.right))}
            | {"background": s.background} for s in scenes]
    blank = [{"left": E, "right": E, "background": "black"} for _ in scenes]
    m = scene_metrics(base, blank, base_img, np.zeros_like(base_img), "star", sides)
    assert m["acc_e"] == 0.0 and m["acc_e_base"] == 1.0 and m["became_empty"] == 1.0
    assert m["retention"] == 0.0 and m["iou"] == 0.0 and m["vanished"] == 1.0 and math.isnan(m["centroid_shift"])
    assert m["h_scene"] == 0.0 and m["drift_l2"] > 0.1 and m["drift_ssim"] < 0.5


def test_an_erasure_that_changes_nothing() -> None:
    scenes = [random_scene(s, p_empty=0.0) for s in range(6)]
    sides = ["left", "right"] * 3
    imgs = np.stack([render_scene(s, k) for k, s in enumerate(scenes)])
    preds = [{side: slot(o.cls, o.color, o.style) for side, o in (("left", s.left), ("right", s.right))}
             | {"background": s.background} for s in scenes]
    target = scenes[0].left.cls
    m = scene_metrics(preds, preds, imgs, imgs.copy(), target, sides)
    assert m["retention"] == 1.0 and m["iou"] == 1.0 and m["centroid_shift"] == 0.0 and m["vanished"] == 0.0
    assert m["drift_l2"] == 0.0 and m["drift_ssim"] == pytest.approx(1.0)
    assert m["acc_e"] == m["acc_e_base"] == acc_e(preds, target, sides) > 0
    assert m["h_scene"] == pytest.approx(h_scene(m["acc_e"], 1.0))
