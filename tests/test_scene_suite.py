"""The scene suite (--suite toy-scenes): its prompt groups, caption files, the metric step on renders, intervals,
refusals before any model loads, and a run through the CLI (eval, bench, rescore) on an untrained scene fixture."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from trace_erase.cli import main
from trace_erase.errors import TraceEraseError
from trace_erase.evaluation.scene_metrics import scene_metrics
from trace_erase.evaluation.scene_scoring import group_metrics, scene_intervals, seed_units
from trace_erase.evaluation.scene_suite import GROUPS, check_scene_handle, scene_model_size
from trace_erase.evaluation.suites import build_suite
from trace_erase.toyworld.render import CLASSES, SYNONYMS
from trace_erase.toyworld.scenes.captions import parse_caption
from trace_erase.toyworld.scenes.render import Scene, SlotObject, render_scene

PER_SEED = {"erased": 18, "alone": 2, "control": 9, "pair": 9, "synonym": 9, "stress": 9}


# --- the suite --------------------------------------------------------------------------------------------------------

def test_built_in_groups_place_the_target_and_the_other_object() -> None:
    suite = build_suite("toy-scenes", "pentagram", 2)  # a synonym names the class
    assert suite.concept == "star" and suite.labels == CLASSES and suite.needs == "slots"
    assert Counter(i.group for i in suite.items) == {g: 2 * n for g, n in PER_SEED.items()}
    assert sorted({i.seed for i in suite.items}) == [0, 1]
    for item in suite.items:
        target, other = item.sides
        assert {target, other} == {"left", "right"}
        stated = parse_caption(item.prompt).sides
        kept = stated.get(other)
        assert (kept.cls if kept else "empty") == item.label
        t_obj = stated.get(target)
        if item.group in ("erased", "alone", "synonym", "stress"):
            assert t_obj is not None and t_obj.cls == "star"
        else:
            assert t_obj is None or t_obj.cls != "star"
        if item.group == "control":
            assert t_obj is None
        if item.group == "synonym":
            assert "star" not in item.prompt.split() and any(s in item.prompt for s in SYNONYMS["star"])
        if item.group == "stress":
            assert (t_obj.color, t_obj.style) == (kept.color, kept.style) and t_obj.color and t_obj.style
    erased = [(i.sides[0], i.label) for i in suite.items if i.group == "erased" and i.seed == 0]
    assert sorted(erased) == sorted((s, c) for c in CLASSES if c != "star" for s in ("left", "right"))
    for group in ("control", "pair", "synonym", "stress"):  # over two seeds every other class on both sides
        seen = {(i.label, i.sides[1]) for i in suite.items if i.group == group}
        assert len(seen) == 18, group
    # every other suite's items are unchanged: no sides
    assert all(i.sides is None for i in build_suite("toy-objects", "star", 1).items)


def test_caption_file_groups_and_one_line_refusals(tmp_path) -> None:
    good = tmp_path / "captions.txt"
    good.write_text("# comment\na star on the left and a house on the right\n\na pentagram on the right and a "
                    "circle on the left\na red striped star on the left and a red striped cross on the right\n"
                    "a star on the right\na heart on the left\na heart on the left and a box on the right\n")
    suite = build_suite("toy-scenes", "star", 2, prompts=str(good))
    first = [(i.group, i.sides, i.label) for i in suite.items if i.seed == 0]
    assert first == [("erased", ("left", "right"), "house"), ("synonym", ("right", "left"), "circle"),
                     ("stress", ("left", "right"), "cross"), ("alone", ("right", "left"), "empty"),
                     ("control", ("right", "left"), "heart"), ("pair", ("left", "right"), "square")]
    assert len(suite.items) == 12 and suite.source == str(good)
    cases = {"a star on the top and a house on the right": "unknown side 'top'",
             "a star on the left and a dragon on the right": "unknown class 'dragon'",
             "a star and a house": "side unstated",
             "a star on the left and a star on the right": "on both sides"}
    for text, message in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(f"a star on the left\n{text}\n")
        with pytest.raises(TraceEraseError, match=message) as err:
            build_suite("toy-scenes", "star", 1, prompts=str(bad))
        assert f"{bad}:2" in str(err.value) and "\n" not in str(err.value)
    only_others = tmp_path / "others.txt"
    only_others.write_text("a heart on the left\n")
    with pytest.raises(TraceEraseError, match="places the erased class"):
        build_suite("toy-scenes", "star", 1, prompts=str(only_others))
    with pytest.raises(TraceEraseError, match="one class at a time"):
        build_suite("toy-scenes", "star,house", 1)
    with pytest.raises(TraceEraseError, match="not a toy object class"):
        build_suite("toy-scenes", "dragon", 1)


# --- the metric step on renders ---------------------------------------------------------------------------------------

def _render(item, drop: str | None = None, blank: bool = False, swap: str | None = None) -> np.ndarray:
    """The picture ``item``'s caption describes (gray background); ``drop`` empties that class's slot, ``swap``
    turns it into a circle, ``blank`` empties both."""
    stated = parse_caption(item.prompt).sides

    def obj(side: str) -> SlotObject | None:
        o = stated.get(side)
        if o is None or blank or o.cls == drop:
            return None
        return SlotObject("circle" if o.cls == swap else o.cls, o.color or "red", o.style or "plain")

    return render_scene(Scene(obj("left"), obj("right"), "gray"), item.seed)


@pytest.fixture(scope="module")
def rendered() -> tuple:
    from trace_erase.evaluation.scorers import scorer_for

    suite = build_suite("toy-scenes", "star", 2)
    scorer = scorer_for(suite, None)
    base = np.stack([_render(i) for i in suite.items])
    return suite, scorer, base


def test_an_erasure_that_blanks_the_target_keeps_the_other_object(rendered) -> None:
    from trace_erase.evaluation.scoring import score_run

    suite, scorer, base = rendered
    erased = np.stack([_render(i, drop="star") for i in suite.items])
    m, per_image = score_run(suite, scorer, base, erased)
    b, e = m["base"], m["erased"]
    assert b["acc_e"] == 1.0 and b["retention"] == 1.0 and b["h_scene"] == 0.0 and b["drift_l2"] == 0.0
    assert e["acc_e"] == 0.0 and e["became_empty"] == 1.0 and e["retention"] == 1.0 and e["h_scene"] == 1.0
    assert e["iou"] == 1.0 and e["centroid_shift"] == 0.0 and e["drift_l2"] == 0.0 and e["drift_ssim"] == 1.0
    for g in ("alone", "synonym", "stress"):
        assert e[f"{g}_acc_e"] == 0.0 and e[f"{g}_retention"] == 1.0 and e[f"{g}_h_scene"] == 1.0
    assert e["control_retention"] == 1.0 and e["pair_retention"] == 1.0 and e["control_acc_e"] == 0.0
    assert e["acc_e_ci95"] == [0.0, 0.0] and e["h_scene_ci95"] == [1.0, 1.0]
    assert per_image[0]["scene"]["became_empty"] == 1.0 and per_image[0]["erased"][suite.items[0].sides[0]] == {
        "class": "empty", "color": None, "style": None}
    # each group's value is scene_metrics() of the group's pictures at once
    idx = [k for k, i in enumerate(suite.items) if i.group == "stress"]
    judged_b, judged_e = scorer.judge(base[idx], [], suite), scorer.judge(erased[idx], [], suite)
    ref = scene_metrics(judged_b, judged_e, base[idx], erased[idx], "star", [suite.items[k].sides[0] for k in idx])
    assert all(e[f"stress_{k}"] == pytest.approx(v) for k, v in ref.items() if k != "acc_e_base")


def test_an_erasure_that_blanks_the_picture_and_one_that_changes_nothing(rendered) -> None:
    from trace_erase.evaluation.scoring import score_run

    suite, scorer, base = rendered
    blank = np.stack([_render(i, blank=True) for i in suite.items])
    e = score_run(suite, scorer, base, blank)[0]["erased"]
    assert e["acc_e"] == 0.0 and e["retention"] == 0.0 and e["h_scene"] == 0.0 and e["vanished"] == 1.0
    assert e["iou"] == 0.0 and e["centroid_shift"] is None and e["drift_l2"] > 0.05
    assert e["control_retention"] == 0.0 and e["alone_retention"] == 1.0  # an empty slot stayed empty
    same = score_run(suite, scorer, base, base.copy())[0]
    assert same["erased"] == same["base"]  # retention 1, Acc_e = base, no drift
    assert same["erased"]["retention"] == 1.0 and same["erased"]["acc_e"] == 1.0
    assert same["erased"]["drift_l2"] == 0.0 and same["erased"]["drift_ssim"] == 1.0


def test_a_partial_erasure_and_its_intervals_over_seeds(rendered) -> None:
    """Seed 0: the target becomes a circle; seed 1: unchanged. Acc_e 0.5, and over two seeds the bootstrap's
    percentiles are the two seeds' values."""
    from trace_erase.evaluation.scoring import score_run

    suite, scorer, base = rendered
    erased = np.stack([_render(i, swap="star") if i.seed == 0 else base[k] for k, i in enumerate(suite.items)])
    e = score_run(suite, scorer, base, erased)[0]["erased"]
    assert e["acc_e"] == 0.5 and e["became_other"] == 0.5 and e["retention"] == 1.0
    assert e["h_scene"] == pytest.approx(2 / 3) and e["acc_e_ci95"] == [0.0, 1.0] and e["h_scene_ci95"] == [0.0, 1.0]
    assert e["retention_ci95"] == [1.0, 1.0]


def test_intervals_over_concepts_and_seeds_by_hand() -> None:
    def records(acc: list[float]) -> list[dict]:
        return [{"acc_e": a, "retention": 1.0, "centroid_shift": None} for a in acc]

    groups = ["erased"] * 4
    a = seed_units([0, 0, 1, 1], groups, records([1.0, 1.0, 1.0, 1.0]))
    b = seed_units([0, 0, 1, 1], groups, records([0.0, 0.0, 0.0, 0.0]))
    assert a[0] == {"seed": 0, "sums": {"erased/acc_e": 2.0, "erased/retention": 2.0}, "n": {"erased/acc_e": 2,
                                                                                             "erased/retention": 2}}
    ci = scene_intervals([a, b])
    assert ci["acc_e_ci95"] == [0.0, 1.0] and ci["retention_ci95"] == [1.0, 1.0] and ci["h_scene_ci95"] == [0.0, 1.0]
    assert "centroid_shift_ci95" not in ci and scene_intervals([a, a])["acc_e_ci95"] == [1.0, 1.0]
    m = group_metrics(records([1.0, 0.0]) + records([0.0]), ["erased", "erased", "control"])
    assert m["acc_e"] == 0.5 and m["h_scene"] == pytest.approx(2 / 3) and m["centroid_shift"] is None
    assert m["control_acc_e"] == 0.0 and "pair_acc_e" not in m


def test_bench_table_columns_and_intervals_for_scenes() -> None:
    from trace_erase.benchmark.tables import markdown, summarize

    def row(concept: str, method: str, acc: float) -> dict:
        recs = [{"acc_e": acc, "retention": 1.0, "drift_l2": 0.01}] * 2
        return {"concept": concept, "method": method, "status": "ok", "acc_e": acc, "retention": 1.0,
                "h_scene": 1.0 - acc, "drift_l2": 0.01, "units": seed_units([0, 1], ["erased"] * 2, recs)}

    rows = [row("star", "base", 1.0), row("house", "base", 1.0), row("star", "uce", 0.0), row("house", "uce", 0.5)]
    means = summarize(rows, "toy-scenes")
    assert means[1]["acc_e"] == 0.25 and means[1]["acc_e_ci95"] == [0.0, 0.5]
    assert means[1]["h_scene_ci95"][0] == pytest.approx(2 / 3) and "acc_e_ci95" not in means[0]
    md = markdown({"means": means, "suite": "toy-scenes", "model": "m", "concepts": ["star", "house"],
                   "seeds_per_prompt": 2, "options": {}, "rows": rows})
    assert "| Acc_e ↓ |" in md and "H_scene ↑" in md and "other-slot L2 ↓" in md and "0.250 [0.000, 0.500]" in md


# --- refusals before any model loads, and a run through the CLI -------------------------------------------------------

@pytest.fixture(scope="module")
def scene_fixture(tmp_path_factory) -> str:
    """A tiny untrained scene pipeline (toy-sd-scenes' micro sizes, random weights) with a scene sidecar."""
    from trace_erase.models.loading import SIDECAR
    from trace_erase.toyworld.components import assemble_pipeline, build_components
    from trace_erase.toyworld.config import preset

    cfg = preset("sd", micro=True, scenes=True)
    folder = tmp_path_factory.mktemp("scene-fixture") / "tiny-scenes"
    assemble_pipeline(cfg, build_components(cfg), (0.0, 1.0)).save_pretrained(folder, safe_serialization=True)
    (folder / SIDECAR).write_text(json.dumps({"sampler": {"steps": 2, "guidance": 8.0, "height": 32, "width": 64},
                                              "training": dataclasses.asdict(cfg)}))
    return str(folder)


def test_bad_input_is_one_line_before_any_model_loads(scene_fixture, tmp_path, capsys, monkeypatch) -> None:
    import trace_erase.models as models
    from trace_erase.toyworld.classifier import CLASSIFIER_DIR

    def no_load(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(models, "load_model", no_load)
    assert scene_model_size(scene_fixture) == (32, 64) and scene_model_size("toy-sd") is None
    bad = tmp_path / "bad.txt"
    bad.write_text("a star on the top and a house on the right\n")
    cases = [(["--model", "toy-sd"], "not a scene model"),
             (["--model", scene_fixture, "--scorer", "toy"], "needs a per-slot judgement"),
             (["--model", scene_fixture, "--scorer", f"scene:{CLASSIFIER_DIR}"], "without per-slot heads"),
             (["--model", scene_fixture, "--prompts", str(bad)], "unknown side 'top'"),
             (["--model", scene_fixture, "--concept", "dragon"], "not a toy object class")]
    for extra, message in cases:
        args = ["eval", "--suite", "toy-scenes", "--output", str(tmp_path / "out"), "--concept", "star", *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
    assert main(["bench", "--model", "toy-sd", "--suite", "toy-scenes", "--methods", "uce", "--concepts", "star",
                 "--output", str(tmp_path / "b")]) == 2
    assert "not a scene model" in capsys.readouterr().err
    assert main(["bench", "--model", scene_fixture, "--suite", "toy-scenes", "--methods", "uce", "--concepts", "star",
                 "--attacks", "paraphrase", "--output", str(tmp_path / "b")]) == 2
    assert "drop --attacks" in capsys.readouterr().err
    suite = build_suite("toy-scenes", "star", 1)  # Python use: the loaded model's sampler size is checked too
    check_scene_handle({"height": 32, "width": 64}, suite, (32, 64))
    with pytest.raises(TraceEraseError, match="draws 32×32 pictures"):
        check_scene_handle({"height": 32, "width": 32}, suite, (32, 64))


def test_scene_suite_end_to_end_through_the_cli(scene_fixture, tmp_path, capsys) -> None:
    bench = tmp_path / "bench"
    code = main(["bench", "--model", scene_fixture, "--suite", "toy-scenes", "--methods", "uce", "--concepts", "star",
                 "--seeds", "1", "--output", str(bench)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((bench / "bench.json").read_text())
    assert [e["method"] for e in result["means"]] == ["base", "uce"]
    uce = result["means"][1]
    assert {"acc_e", "retention", "h_scene", "iou", "control_retention"} <= set(uce) and len(uce["h_scene_ci95"]) == 2
    md = (bench / "bench.md").read_text()
    assert "H_scene ↑" in md and "| uce |" in md
    assert not any(k.endswith("_ci95") for k in result["rows"][0])
    base_row = next(r for r in result["rows"] if r["method"] == "base")
    assert base_row["retention"] == 1.0 and base_row["drift_l2"] == 0.0

    out = tmp_path / "eval"
    code = main(["eval", "--model", scene_fixture, "--suite", "toy-scenes", "--seeds", "1", "--output", str(out),
                 "--erasure", str(bench / "runs" / "star" / "uce" / "erasure")])
    printed = capsys.readouterr().out
    assert code == 0 and "H_scene" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "toy-scenes" and res["concept"] == "star" and res["settings"]["sampler"]["width"] == 64
    assert Counter(p["group"] for p in res["prompts"]) == PER_SEED and all(len(p["sides"]) == 2 for p in res["prompts"])
    assert res["settings"]["scorer"]["name"] == "toy-scene-scorer" and "masked" in res["settings"]["drift"]
    e = res["metrics"]["erased"]
    assert all(f"{g}_h_scene" in e for g in GROUPS if g != "erased") and len(e["retention_ci95"]) == 2
    assert set(res["per_image"][0]) == {"base", "erased", "scene"}
    assert e["acc_e"] == uce["acc_e"]  # same seeds, same erasure as the bench run
    report = (out / "report.html").read_text()
    assert "target slot" in report and "other slot" in report and "other alone (control)" in report
    assert len(list((out / "images" / "erased").glob("*.png"))) == sum(PER_SEED.values())

    code = main(["rescore", str(out), "--output", str(tmp_path / "rescored"), "--scorer", "scene"])
    assert code == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert again["metrics"] == res["metrics"] and again["prompts"] == res["prompts"]
