"""Evaluation: metric formulas, the toy suites, results.json / report.html, and the demo on a micro model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trace_erase import TraceEraseError, erase
from trace_erase.cli import main
from trace_erase.evaluation import h_identities, h_objects, h_styles, pixel_drift, ssim
from trace_erase.evaluation.run import evaluate
from trace_erase.evaluation.suites import build_suite, toy_class_of
from trace_erase.models import load_model


def test_metric_formulas() -> None:
    assert h_identities(0.0430, 0.8456) == pytest.approx(0.8979, abs=1e-4)
    assert h_objects(0.1, 0.9, 0.2) == pytest.approx(3 / (1 / 0.9 + 1 / 0.9 + 1 / 0.8))
    assert h_objects(1.0, 0.9, 0.0) == 0.0 and h_objects(0.0, 0.0, 0.0) == 0.0
    assert h_styles(0.31, 0.25) == pytest.approx(0.06)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert pixel_drift(a, a) == 0.0 and ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8)
    assert 0 < pixel_drift(a, b) < np.sqrt(3) and ssim(a, b) < 1.0
    white, black = np.full((1, 4, 4, 3), 255, np.uint8), np.zeros((1, 4, 4, 3), np.uint8)
    assert pixel_drift(white, black) == pytest.approx(np.sqrt(3))


def test_suites() -> None:
    items = build_suite("toy-objects", "disc", seeds=2).items  # a synonym names its class
    assert toy_class_of("disc") == "circle"
    groups = [i.group for i in items]
    assert groups.count("erased") == 2 and groups.count("synonym") == 6 and groups.count("other") == 18
    assert groups.count("composed") == 8  # 4 compositions per seed, in templates stage A never uses
    from trace_erase.engines.prompts import DEFAULT_TEMPLATES

    composed = [i.prompt for i in items if i.group == "composed"]
    assert not {t.format(n) for t in DEFAULT_TEMPLATES for n in ("circle", "disc", "round", "orb")} & set(composed)
    assert any(" on a " in p and " background" in p for p in composed)
    assert all(i.label == "circle" for i in items if i.group != "other")
    styles = build_suite("toy-styles", "striped", seeds=3).items
    assert sum(i.group == "erased" for i in styles) == 3 and all(i.head == "style" for i in styles)
    with pytest.raises(TraceEraseError, match="unknown suite 'nope'"):
        build_suite("nope", "circle", 1)
    with pytest.raises(TraceEraseError, match="'zebra' is not a class of the toy class set"):
        build_suite("toy-objects", "zebra", 1)


def test_evaluate_writes_results_and_report(micro_sd, tmp_path) -> None:
    handle = load_model(micro_sd)
    er = erase(handle, ["circle"], method="uce", progress=False)
    res = evaluate(handle, er, "toy-objects", "circle", tmp_path / "ev", seeds=2, progress=False)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    for key in ("seeds", "sampler", "scorer", "suite", "versions", "erasure_config", "formulas"):
        assert key in saved["settings"], key
    assert saved["settings"]["sampler"]["steps"] == 2 and saved["settings"]["scorer"]["sha256"]
    assert set(saved["metrics"]["erased"]) >= {"acc_e", "acc_s", "acc_g", "h_o", "drift_l2", "drift_ssim",
                                               "fid_vs_base"}
    report = (tmp_path / "ev" / "report.html").read_text()
    assert report.count('<img src="images/') == 2 * 2 * 17  # 13 prompts + 4 compositions
    assert 'src="per_label.png"' in report and (tmp_path / "ev" / "per_label.png").is_file()
    assert len(list((tmp_path / "ev" / "images" / "erased").glob("*.png"))) == 34
    assert saved["metrics"]["erased"]["acc_c"] is not None
    assert res["metrics"]["base"]["drift_l2"] == 0.0
    with pytest.raises(TraceEraseError, match="already exists"):
        evaluate(handle, None, "toy-objects", "circle", tmp_path / "ev", seeds=1, progress=False)


def test_evaluate_quality_metrics(micro_sd, tiny_clip, tmp_path) -> None:
    from PIL import Image

    from trace_erase.toyworld.data import render_set

    ref = tmp_path / "reference"
    ref.mkdir()
    for k, img in enumerate(render_set(4_000_000, 8, progress=False).images):
        Image.fromarray(img).save(ref / f"{k}.png")
    handle = load_model(micro_sd)
    er = erase(handle, ["circle"], method="uce", progress=False)
    res = evaluate(handle, er, "toy-objects", "circle", tmp_path / "ev", seeds=1, progress=False, reference=ref,
                   clip_model=tiny_clip)
    base, erased = res["metrics"]["base"], res["metrics"]["erased"]
    assert base["fid_vs_base"] == 0.0 and erased["fid_vs_base"] >= 0.0
    assert base["fid_reference"] > 0 and erased["fid_reference"] > 0
    assert 0 <= base["clip_score"] <= 100 and 0 <= erased["clip_score"] <= 100
    q = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]["quality"]
    assert q["library"].startswith("torchmetrics 1.9") and q["reference"] == str(ref)
    assert q["clip_model"] == tiny_clip


def test_demo_and_eval_cli(micro_sd, tmp_path, capsys) -> None:
    code = main(["demo", "--model", micro_sd, "--output", str(tmp_path / "d"), "--seeds", "1",
                 "--option", "steps=2", "--option", "rollout_steps=2", "--option", "pool_trajectories=1",
                 "--option", "templates=['{}']"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "H_o" in out and "report:" in out
    assert (tmp_path / "d" / "erasure" / "erasure.json").is_file()
    assert (tmp_path / "d" / "eval" / "report.html").is_file()
    assert main(["eval", "--model", micro_sd, "--output", str(tmp_path / "d" / "eval"), "--concept",
                 "circle"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "--model", micro_sd, "--output", str(tmp_path / "e2"), "--suite", "bad",
                 "--concept", "circle"]) == 2
    assert "unknown suite 'bad'" in capsys.readouterr().err


def test_bench_micro(micro_sd, tmp_path, capsys) -> None:
    captions = tmp_path / "words" / "captions.txt"  # a sweep value that is a path names a row, not a folder
    captions.parent.mkdir()
    captions.write_text("a red house\na blue car\n")
    code = main(["bench", "--model", micro_sd, "--output", str(tmp_path / "b"), "--methods", "uce,esd-x",
                 "--concepts", "circle", "--seeds", "1", "--sweep", f"tau=0.3+rho=0.5+pres_corpus={captions}",
                 "--option", "steps=2", "--option", "rollout_steps=2", "--option", "pool_trajectories=1",
                 "--option", "templates=['{}']"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    methods = [e["method"] for e in result["means"]]
    swept = f"trace[tau=0.3][rho=0.5][pres_corpus={captions}]"
    assert methods == ["base", "uce", "esd-x", swept]
    assert result["rows"][2]["status"] == "ok", result["rows"][2]
    assert (tmp_path / "b" / "runs" / "circle" / swept.replace("/", "_") / "report.html").is_file()
    assert result["rows"][0]["status"] == "ok" and "h_o" in result["means"][1]
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| uce |" in md and "H_o" in md
    assert len(result["means"][1]["h_o_ci95"]) == 2 and "bootstrap 95 %" in md
    report = (tmp_path / "b" / "report.html").read_text()
    assert (tmp_path / "b" / "tradeoff.png").stat().st_size > 1000 and 'src="tradeoff.png"' in report
    assert 'href="runs/circle/uce/report.html"' in report
    assert (tmp_path / "b" / "runs" / "circle" / "esd-x" / "report.html").is_file()


def test_bench_lists_unsupported_methods() -> None:
    from trace_erase.benchmark.tables import markdown, summarize

    rows = [{"concept": "circle", "method": "base", "status": "ok", "acc_e": 1.0, "acc_s": 1.0, "acc_g": 1.0,
             "h_o": 0.0, "drift_l2": 0.0, "drift_ssim": 1.0, "erase_s": 0.0},
            {"concept": "circle", "method": "sd-only", "status": "unsupported"}]
    table = summarize(rows)
    assert table[1] == {"method": "sd-only", "status": "unsupported"}
    assert "sd-only | unsupported" in markdown({"means": table, "model": "m", "suite": "toy-objects",
                                                "concepts": ["circle"],
                                                "seeds_per_prompt": 1, "options": {}})


def test_nudity_suite_on_micro_model(micro_sd, tmp_path, capsys) -> None:
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                   "a red circle,3,5.0,sexual\na blue star,4,7.5,violence\n")
    code = main(["eval", "--model", micro_sd, "--suite", "nudity", "--prompts", str(csv),
                 "--output", str(tmp_path / "n")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "n" / "results.json").read_text())
    assert res["settings"]["scorer"]["version"] == "3.4.2" and res["settings"]["scorer"]["threshold"] == 0.6
    assert [p["seed"] for p in res["prompts"]] == [3, 4] and res["metrics"]["base"]["total_exposed"] >= 0
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nx\n")
    assert main(["eval", "--model", micro_sd, "--suite", "nudity", "--prompts", str(bad),
                 "--output", str(tmp_path / "n2")]) == 2
    assert "lacks the column(s) prompt" in capsys.readouterr().err


def _one_and_two_processes(args: list[str], tmp_path) -> tuple[dict, dict]:
    """results.json of the command run in one process (→ tmp_path/one) and under ``accelerate launch`` with two CPU
    processes over gloo (→ tmp_path/two)."""
    from .conftest import run_cli

    single = run_cli([*args, "--output", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_cli([*args, "--output", str(tmp_path / "two")], processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    return tuple(json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))


def test_two_process_sharding_matches_one_process(micro_sd, tmp_path) -> None:
    from PIL import Image

    one, two = _one_and_two_processes(["eval", "--model", micro_sd, "--concept", "circle", "--seeds", "2"], tmp_path)
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    assert one["prompts"] == two["prompts"]
    for k in range(len(one["prompts"])):
        a = np.asarray(Image.open(tmp_path / "one" / "images" / "base" / f"{k:05d}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "two" / "images" / "base" / f"{k:05d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 2, k  # same seeds; batch composition may flip a rounding
    for side in ("base", "erased"):  # accuracies exactly; FID (an eigen-decomposition) to numerical noise
        assert one["metrics"][side] == pytest.approx(two["metrics"][side], abs=1e-3)


def test_two_process_nudity_matches_one_process(micro_sd, tmp_path) -> None:
    """The I2P protocol is sharded like the other suites: 2 processes (gloo) give the 1-process result, and only the
    main process writes the folder."""
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                   "a red circle,3,5.0,sexual\na blue star,4,7.5,violence\na green heart,5,5.0,sexual\n")
    one, two = _one_and_two_processes(["eval", "--model", micro_sd, "--suite", "nudity", "--prompts", str(csv)],
                                      tmp_path)
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    assert one["metrics"] == two["metrics"] and one["per_image"] == two["per_image"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftover temp folder


def test_merge_results_recomputes_means_over_disjoint_concepts() -> None:
    from trace_erase.benchmark.tables import merge_results
    from trace_erase.errors import TraceEraseError

    def run(concept: str, acc_s: float) -> dict:
        row = {"concept": concept, "method": "trace", "status": "ok", "acc_e": 0.0, "acc_s": acc_s, "acc_g": 0.0,
               "h_o": 0.5, "drift_l2": 0.1, "drift_ssim": 0.9, "erase_s": 1.0}
        return {"model": "toy-sd", "suite": "toy-objects", "seeds_per_prompt": 5, "options": {}, "sweep": [],
                "methods": ["trace"], "concepts": [concept], "rows": [row], "means": []}

    merged = merge_results([run("circle", 0.6), run("heart", 1.0)])
    assert merged["concepts"] == ["circle", "heart"] and len(merged["rows"]) == 2
    assert merged["means"][-1]["acc_s"] == pytest.approx(0.8) and merged["means"][-1]["concepts"] == 2
    with pytest.raises(TraceEraseError, match="appears in two runs"):
        merge_results([run("circle", 0.6), run("circle", 1.0)])
    kept = merge_results([run("circle", 0.6), run("circle", 1.0), run("heart", 1.0)], first_wins=True)
    assert [(r["concept"], r["acc_s"]) for r in kept["rows"]] == [("circle", 0.6), ("heart", 1.0)]
    other = run("heart", 1.0) | {"seeds_per_prompt": 10}
    with pytest.raises(TraceEraseError, match="differ in 'seeds_per_prompt'"):
        merge_results([run("circle", 0.6), other])


def test_bootstrap_intervals_over_concepts_and_seeds() -> None:
    """Identical concepts and seeds give a zero-width interval at the table's value; spread gives one around it."""
    from trace_erase.evaluation.intervals import bootstrap

    def unit(seed: int, e: int, s: int, g: int, drift: float) -> dict:
        return {"seed": seed, "hits": {"erased": e, "other": s, "synonym": g}, "n": {"erased": 1, "other": 1,
                                                                                    "synonym": 1}, "drift": [drift]}

    same = [[unit(k, 0, 1, 0, 0.1) for k in range(3)] for _ in range(4)]
    ci = bootstrap("toy-objects", same, draws=200)
    assert ci["headline"] == (1.0, 1.0) and ci["drift_l2"] == pytest.approx((0.1, 0.1))
    mixed = [[unit(0, 0, 1, 0, 0.1), unit(1, 1, 1, 0, 0.3)], [unit(0, 0, 0, 1, 0.2), unit(1, 0, 1, 0, 0.2)]]
    lo, hi = bootstrap("toy-objects", mixed, draws=500)["headline"]
    assert lo < hi and lo >= 0.0 and hi <= 1.0
    lo, hi = bootstrap("toy-objects", mixed, draws=500)["drift_l2"]
    assert lo < 0.2 < hi
    # the styles suite has no synonyms: its headline is H_s from the erased and other groups alone
    styles = [[{"seed": k, "hits": {"erased": 0, "other": 1}, "n": {"erased": 1, "other": 2}, "drift": [0.1]}
               for k in range(3)] for _ in range(2)]
    assert bootstrap("toy-styles", styles, draws=50)["headline"] == pytest.approx((2 / 3, 2 / 3))


def test_paired_bootstrap_sees_a_gap_that_separate_intervals_hide() -> None:
    """Classes of very different difficulty widen each method's own interval; the paired difference cancels them."""
    from trace_erase.evaluation.intervals import bootstrap, paired_bootstrap

    def unit(seed: int, s: int, n_other: int = 10, drift: float = 0.1) -> dict:
        return {"seed": seed, "hits": {"erased": 0, "other": s, "synonym": 0},
                "n": {"erased": 1, "other": n_other, "synonym": 1}, "drift": [drift]}

    # four classes from hard to easy; the focus keeps one more of the ten other prompts on every class and seed
    other = [[unit(k, base + (k % 2)) for k in range(6)] for base in (3, 5, 7, 8)]
    focus = [[unit(k, base + (k % 2) + 1, drift=0.08) for k in range(6)] for base in (3, 5, 7, 8)]
    gap = paired_bootstrap("toy-objects", focus, other, draws=500)
    assert gap["headline"]["mean"] > 0 and gap["headline"]["ci"][0] > 0
    assert gap["drift_l2"]["mean"] == pytest.approx(-0.02) and gap["drift_l2"]["ci"][1] < 0
    lo_f, _ = bootstrap("toy-objects", focus, draws=500)["headline"]
    _, hi_o = bootstrap("toy-objects", other, draws=500)["headline"]
    assert lo_f < hi_o  # the separate intervals overlap: they could not say the focus is ahead
    # the order of the methods flips the sign; a method against itself is 0 with no spread
    back = paired_bootstrap("toy-objects", other, focus, draws=500)
    assert back["headline"]["mean"] == pytest.approx(-gap["headline"]["mean"]) and back["headline"]["ci"][1] < 0
    assert paired_bootstrap("toy-objects", other, other, draws=50)["headline"] == {"mean": 0.0, "ci": (0.0, 0.0)}
    with pytest.raises(TraceEraseError, match="same seeds"):
        paired_bootstrap("toy-objects", focus, [[unit(k + 1, 5) for k in range(6)] for _ in range(4)])
    with pytest.raises(TraceEraseError, match="same concepts"):
        paired_bootstrap("toy-objects", focus, other[:3])


def test_merge_relabel_makes_option_variants_rows_of_one_table() -> None:
    from trace_erase.benchmark.tables import merge_results

    def run(options: dict, h_o: float) -> dict:
        rows = [{"concept": "circle", "method": "base", "status": "ok", "h_o": 0.0},
                {"concept": "circle", "method": "trace", "status": "ok", "h_o": h_o}]
        return {"model": "m", "suite": "toy-objects", "seeds_per_prompt": 1, "options": options, "sweep": [],
                "methods": ["trace"], "concepts": ["circle"], "rows": rows}

    merged = merge_results([run({}, 0.8), run({"reference": "original"}, 0.9)], relabel=True)
    names = [e["method"] for e in merged["means"]]
    assert names == ["base", "trace", "trace{reference=original}"]
    assert [e["h_o"] for e in merged["means"]][1:] == [0.8, 0.9]
    with pytest.raises(TraceEraseError, match="differ in 'options'"):
        merge_results([run({}, 0.8), run({"reference": "original"}, 0.9)])

    # a merge of default-option runs merges again with plain names (its options read as the defaults)
    same = merge_results([run({}, 0.8), run({}, 0.8) | {"concepts": ["heart"], "rows": [
        {"concept": "heart", "method": "trace", "status": "ok", "h_o": 0.6}]}], relabel=True)
    assert same["options"] == {}
    other = run({}, 0.7) | {"concepts": ["star"], "methods": ["trace", "ant"], "rows": [
        {"concept": "star", "method": "trace", "status": "ok", "h_o": 0.7}]}
    again = merge_results([same | {"options": {"per run": [{}, {}]}}, other], relabel=True)
    assert [e["method"] for e in again["means"]] == ["base", "trace"] and again["options"] == {}


def test_keep_concepts_cuts_a_bench_to_a_half() -> None:
    from trace_erase.benchmark.tables import keep_concepts
    from trace_erase.evaluation.suites import toy_split

    classes = ["circle", "square", "star"]
    bench = {"concepts": classes, "rows": [{"concept": c, "method": m, "h_o": 0.5} for c in classes
                                           for m in ("base", "trace")]}
    dev = [c for c in classes if c in toy_split("dev")]
    assert dev and keep_concepts(bench, "square,star")["concepts"] == ["square", "star"]
    assert {r["concept"] for r in keep_concepts(bench, "circle")["rows"]} == {"circle"}
    assert keep_concepts(bench, None) is bench
    with pytest.raises(TraceEraseError, match="this bench has no 'heart'"):
        keep_concepts(bench, "dev")


def test_keep_seeds_recomputes_a_row_from_its_first_seeds() -> None:
    """A 4-seed row whose first two seeds erased and last two did not: cut to 2 seeds it reads as erased, with H_o and
    drift from those seeds alone and the image statistics the units lack left out; all seeds give the row back."""
    from trace_erase.benchmark.tables import keep_seeds
    from trace_erase.evaluation.metrics import h_objects

    def unit(seed: int, erased: int, drift: float) -> dict:
        return {"seed": seed, "hits": {"erased": erased, "other": 2, "synonym": 0, "composed": erased},
                "n": {"erased": 1, "other": 3, "synonym": 1, "composed": 1}, "drift": [drift, drift]}

    units = [unit(0, 0, 0.1), unit(1, 0, 0.1), unit(2, 1, 0.3), unit(3, 1, 0.3)]
    row = {"concept": "circle", "method": "trace", "status": "ok", "acc_e": 0.5, "acc_s": 2 / 3, "acc_g": 0.0,
           "acc_c": 0.5, "h_o": h_objects(0.5, 2 / 3, 0.0), "drift_l2": 0.2, "drift_ssim": 0.9, "fid_vs_base": 3.0,
           "erase_s": 5.0, "units": units}
    bench = {"model": "toy-sd", "suite": "toy-objects", "seeds_per_prompt": 4, "concepts": ["circle"],
             "rows": [row], "means": []}
    cut = keep_seeds(bench, 2)
    two = cut["rows"][0]
    assert cut["seeds_per_prompt"] == 2 and [u["seed"] for u in two["units"]] == [0, 1]
    assert (two["acc_e"], two["acc_c"], two["acc_s"]) == (0.0, 0.0, pytest.approx(2 / 3))
    assert two["h_o"] == pytest.approx(h_objects(0.0, 2 / 3, 0.0)) and two["drift_l2"] == pytest.approx(0.1)
    assert "drift_ssim" not in two and "fid_vs_base" not in two and two["erase_s"] == 5.0
    assert cut["means"][-1]["h_o"] == pytest.approx(two["h_o"])
    whole = keep_seeds(bench, 4)["rows"][0]
    assert all(whole[k] == pytest.approx(row[k]) for k in ("acc_e", "acc_s", "acc_g", "acc_c", "h_o", "drift_l2"))
    assert keep_seeds(bench, None) is bench
    with pytest.raises(TraceEraseError, match="seeds must be 1..4"):
        keep_seeds(bench, 5)


def test_toy_halves_are_disjoint_and_fixed_for_classes_and_styles() -> None:
    """Defaults are chosen on ``dev`` and reported on ``test``: the halves must not overlap, must cover everything
    erasable, and must not move (a moved half would let a choice see its test set)."""
    from trace_erase.benchmark.plan import resolve_concepts
    from trace_erase.evaluation.suites import toy_split
    from trace_erase.toyworld.render import CLASSES, STYLES

    for kind, items in (("classes", CLASSES), ("styles", STYLES[1:])):
        dev, test = toy_split("dev", kind), toy_split("test", kind)
        assert not set(dev) & set(test) and set(dev) | set(test) == set(items) and len(dev) == len(test)
    assert toy_split("dev") == ("square", "star", "heart", "arrow", "diamond")
    assert toy_split("dev", "styles") == ("striped", "checkered")
    assert resolve_concepts("test", "toy-styles") == ["dotted", "outlined"]
    assert resolve_concepts("dev", "toy-objects") == list(toy_split("dev"))
    with pytest.raises(TraceEraseError, match="toy world's split"):
        resolve_concepts("dev", "objects")


def test_bench_report_renders_in_headless_chromium(tmp_path) -> None:
    """The bench report (figures + table) renders in a real browser; skipped where Debian's chromium is absent."""
    import shutil
    import subprocess

    from trace_erase.benchmark.tables import summarize, write_tables

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    rows = []
    for concept, h in (("circle", 0.9), ("square", 0.7)):
        rows.append({"concept": concept, "method": "base", "status": "ok", "h_o": 0.0, "drift_l2": 0.0})
        for method, shift in (("trace", 0.05), ("uce", -0.2)):
            rows.append({"concept": concept, "method": method, "status": "ok", "h_o": h + shift,
                         "drift_l2": 0.1 - shift / 4, "acc_e": 0.1, "acc_s": 0.9, "acc_g": 0.1, "erase_s": 1.0})
    result = {"model": "toy-sd", "suite": "toy-objects", "concepts": ["circle", "square"], "seeds_per_prompt": 1,
              "options": {}, "rows": rows, "means": summarize(rows, "toy-objects")}
    figures = write_tables(result, tmp_path)
    assert [f.name for f in figures] == ["tradeoff.png", "per_concept.png"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,900",
                    f"--screenshot={shot}", (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # something was drawn (figures and table), not a blank page


def test_eval_figure_bars_are_the_per_label_means() -> None:
    from trace_erase.evaluation.plots import per_label_means

    prompts = [{"group": "other", "label": "square"}, {"group": "erased", "label": "circle"},
               {"group": "erased", "label": "circle"}, {"group": "synonym", "label": "circle"}]
    per_image = [{"base": {"label": "square"}, "erased": {"label": "square"}},
                 {"base": {"label": "circle"}, "erased": {"label": "star"}},
                 {"base": {"label": "circle"}, "erased": {"label": "circle"}},
                 {"base": {"label": "heart"}, "erased": {"label": "heart"}}]
    results = {"suite": "toy-objects", "prompts": prompts, "per_image": per_image}
    assert per_label_means(results) == [("erased", "circle", 1.0, 0.5), ("synonym", "circle", 0.0, 0.0),
                                        ("other", "square", 1.0, 1.0)]
    styles = {"suite": "styles", "prompts": [{"group": "erased", "label": "x"}] * 2,
              "per_image": [{"base": {"score": 0.3}, "erased": {"score": 0.1}},
                            {"base": {"score": 0.5}, "erased": {"score": 0.2}}]}
    assert per_label_means(styles) == [("erased", "x", pytest.approx(0.4), pytest.approx(0.15))]
