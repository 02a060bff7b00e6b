"""``bench`` with concept sets: what the multi-concept bench reuses instead of rerunning, and its bad input."""

from __future__ import annotations

import json
import random

import pytest
from safetensors.torch import load_file

from trace_erase.benchmark.bench import run_bench
from trace_erase.benchmark.many_concepts import SET_ROWS, _set_rows, concept_sets, run_multi_bench
from trace_erase.cli import main
from trace_erase.errors import TraceEraseError
from trace_erase.models import load_model

TINY = {"steps": 2, "rollout_steps": 2, "pool_trajectories": 1, "templates": ["{}"], "preserve_corpus": None}


def test_sum_reuses_the_per_concept_loras_that_fuse_trained(micro_sd, tmp_path) -> None:
    handle = load_model(micro_sd)
    run_bench(handle, ["trace"], ["circle,square"], tmp_path / "b", seeds=1, progress=False, options=TINY,
              sweep=[{"multi": "sum"}])
    runs = tmp_path / "b" / "runs" / "circle,square"
    fuse = json.loads((runs / "trace" / "erasure" / "erasure.json").read_text())
    summed = json.loads((runs / "trace[multi=sum]" / "erasure" / "erasure.json").read_text())
    assert fuse["multi"] == "fuse" and summed["multi"] == "sum"
    assert "resumed" not in fuse["trajectory_log"]  # fuse trained both
    assert summed["trajectory_log"]["resumed"] == ["circle", "square"]  # sum trained none
    # its time still counts what the reused LoRAs took to train: the bench row is not just the fusion's seconds
    rows = {r["method"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert summed["timings"]["stage_b_resumed_s"] == pytest.approx(fuse["timings"]["stage_b_s"], abs=2e-3)
    row = rows["trace[multi=sum]"]
    assert row["erase_reused_s"] == summed["timings"]["stage_b_resumed_s"] > 0
    assert row["erase_s"] >= summed["timings"]["wall_time_s"] + row["erase_reused_s"] - 0.01
    assert "includes the training time" in (tmp_path / "b" / "bench.md").read_text()
    a = load_file(str(runs / "trace" / "erasure" / fuse["fusion"]["weight_name"]))
    b = load_file(str(runs / "trace[multi=sum]" / "erasure" / summed["fusion"]["weight_name"]))
    factors = [k for k in a if k.startswith("concept.")]
    assert factors and all((a[k] == b[k]).all() for k in factors)


@pytest.fixture(scope="module")
def singletons(micro_sd, tmp_path_factory):
    """A bench of one class alone, its rows copied to the other nine (what a bench of every class would hold)."""
    from trace_erase.evaluation.suites import load_class_set

    tmp = tmp_path_factory.mktemp("singletons")
    res = run_bench(load_model(micro_sd), ["uce"], ["circle"], tmp / "one", seeds=1, progress=False)
    rows = [{**r, "concept": c} for c in load_class_set("toy").classes for r in res["rows"]]
    path = tmp / "singletons.json"
    path.write_text(json.dumps({**res, "rows": rows}))
    return path, {r["method"]: r for r in res["rows"]}


def test_multi_bench_takes_n1_from_singletons_and_runs_only_the_sets(micro_sd, singletons, tmp_path) -> None:
    handle = load_model(micro_sd)
    path, source = singletons
    res = run_multi_bench(handle, ["uce"], [1, 2], tmp_path / "m", subsets=1, seeds=1, singletons=path,
                          progress=False)
    assert not (tmp_path / "m" / "N1").exists()  # nothing rerun at N = 1
    assert (tmp_path / "m" / "N2" / "set0" / "bench.json").is_file()
    n1 = [r for r in res["rows"] if r["n"] == 1 and r["method"] == "uce"]
    assert len(n1) == 10 and all(r["h_o"] == source["uce"]["h_o"] and r["from"] == str(path) for r in n1)
    assert {r["method"] for r in res["rows"] if r["n"] == 2} == {"base", "uce"}
    (n2,) = [e for e in res["summary"] if e["method"] == "uce" and e["n"] == 2]
    n2_row = next(r for r in res["rows"] if r["n"] == 2 and r["method"] == "uce")
    alone = source["uce"]["acc_e"]
    assert n2["interference"] == pytest.approx(sum(v - alone for v in n2_row["per_class_acc_e"].values()) / 2)
    # a finished set resumes from its small set_rows.json alone (what git keeps of a long run), running nothing
    import shutil

    for child in (tmp_path / "m" / "N2" / "set0").iterdir():
        if child.name != "set_rows.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    again = run_multi_bench(handle, ["uce"], [1, 2], tmp_path / "m", subsets=1, seeds=1, singletons=path,
                            progress=False, resume=True)
    assert sorted((tmp_path / "m" / "N2" / "set0").iterdir()) == [tmp_path / "m" / "N2" / "set0" / "set_rows.json"]
    assert again["rows"] == res["rows"] and again["summary"] == res["summary"]


def test_a_sweep_that_only_sets_multi_is_the_method_itself_at_n1(micro_sd, singletons, tmp_path) -> None:
    handle = load_model(micro_sd)
    relabelled = json.loads(singletons[0].read_text())
    relabelled["rows"] = [{**r, "method": "trace"} if r["method"] == "uce" else r for r in relabelled["rows"]]
    path = tmp_path / "singletons.json"
    path.write_text(json.dumps(relabelled))
    res = run_multi_bench(handle, ["trace"], [1], tmp_path / "m", subsets=1, seeds=1, singletons=path,
                          sweep=[{"multi": "sum"}], progress=False)
    assert not (tmp_path / "m" / "N1").exists() and res["aliases_at_n1"] == ["trace[multi=sum]"]
    by = {(r["set"][0], r["method"]): r for r in res["rows"]}
    assert all(by[(c, "trace[multi=sum]")]["h_o"] == by[(c, "trace")]["h_o"] for c, _ in by)


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "3"], "has seeds_per_prompt 1, this bench 3"),
    (["--option", "steps=5"], "has options {}, this bench {'steps': 5}"),
])
def test_singletons_that_do_not_match_are_one_line(micro_sd, singletons, tmp_path, capsys, extra, message) -> None:
    path, _ = singletons
    code = main(["bench", "--model", micro_sd, "--multi", "1,2", "--singletons", str(path), "--output",
                 str(tmp_path / "m"), "--seeds", "1", *extra])  # the last --seeds wins
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_singletons_bad_input_is_one_line(micro_sd, tmp_path, capsys) -> None:
    assert main(["bench", "--model", micro_sd, "--singletons", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert "add --concept-counts" in capsys.readouterr().err
    assert main(["bench", "--model", micro_sd, "--multi", "1,2", "--singletons", str(tmp_path / "none.json"),
                 "--output", str(tmp_path / "m")]) == 2
    assert "is not a bench.json with rows" in capsys.readouterr().err


def test_the_subsets_of_one_n_are_distinct_and_the_earlier_draws_stay() -> None:
    classes = [f"c{i}" for i in range(10)]
    sets = concept_sets(classes, [2, 8], subsets=3)
    for n in (2, 8):
        assert len({tuple(g) for g in sets[n]}) == 3 and all(len(g) == n for g in sets[n])
    # seed 0 draws set 0 again as its third 8-class set: that draw is replaced, the ones before it are kept
    rng = random.Random(8)
    first = [sorted(rng.sample(classes, 8)) for _ in range(3)]
    assert first[2] == first[0] and sets[8][:2] == first[:2]
    assert len({tuple(g) for g in concept_sets(classes, [9], subsets=10)[9]}) == 10  # every one there is


def test_singletons_run_only_when_n1_is_asked_for(micro_sd, tmp_path, capsys) -> None:
    classes = [f"c{i}" for i in range(10)]
    assert sorted(concept_sets(classes, [2, 5], subsets=1)) == [2, 5]  # a fusion choice runs no singletons
    assert concept_sets(classes, [1, 2], subsets=1)[1] == [[c] for c in classes]
    assert main(["bench", "--model", micro_sd, "--concept-counts", "2,5", "--singletons", str(tmp_path / "s.json"),
                 "--output", str(tmp_path / "m")]) == 2
    assert "has no N = 1; add 1 to --concept-counts" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_more_subsets_than_exist_and_a_folder_of_another_set_are_one_line(micro_sd, tmp_path, capsys) -> None:
    assert main(["bench", "--model", micro_sd, "--concept-counts", "1,9", "--subsets", "11",
                 "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "only 10 distinct sets of 9" in err and len(err.strip().splitlines()) == 1
    folder = tmp_path / "N2" / "set0"
    folder.mkdir(parents=True)
    (folder / SET_ROWS).write_text(json.dumps({"group": ["a", "b"], "rows": []}))
    with pytest.raises(TraceEraseError, match="holds the set a,b, not a,c"):
        _set_rows(None, folder, ["a", "c"], ["trace"], [], 1, True, {})
    (folder / SET_ROWS).unlink()
    (folder / "bench.json").write_text(json.dumps({"rows": [{"concept": "a,b", "method": "trace"}]}))
    with pytest.raises(TraceEraseError, match="holds a bench of a,b, not a,c"):
        _set_rows(None, folder, ["a", "c"], ["trace"], [], 1, True, {})


def test_multi_bench_draws_from_a_pool_and_preserves_the_retained_classes(micro_sd, tmp_path) -> None:
    """``--concepts dev --preserve-retained``: sets come from the development half only, and every method is asked
    to keep exactly the classes its set does not erase."""
    from trace_erase.evaluation.suites import load_class_set, toy_split

    dev = list(toy_split("dev"))[:3]  # three of the half
    res = run_multi_bench(load_model(micro_sd), ["uce"], [2], tmp_path / "m", subsets=2, seeds=1, pool=dev,
                          preserve_retained=True, progress=False)
    groups = res["subsets"]["2"]
    assert len(groups) == 2 and all(set(g) <= set(dev) for g in groups) and res["pool"] == dev
    assert "1" not in res["subsets"] and not (tmp_path / "m" / "N1").exists()  # no N = 1 asked for: no singletons
    everything = list(load_class_set("toy").classes)
    for k, group in enumerate(groups):
        run = tmp_path / "m" / "N2" / f"set{k}" / "runs" / ",".join(group) / "uce" / "erasure" / "erasure.json"
        concepts = json.loads(run.read_text())["concepts"]
        assert [c["name"] for c in concepts] == group
        assert all(c["preserve"] == [x for x in everything if x not in group] for c in concepts)
    assert "--preserve-retained" in (tmp_path / "m" / "multi.md").read_text()


def test_preserve_retained_bad_input(micro_sd, singletons, tmp_path, capsys) -> None:
    base = ["bench", "--model", str(micro_sd), "--methods", "uce", "--output", str(tmp_path / "x")]
    for extra, needle in ((["--preserve-retained"], "add --concept-counts"),
                          (["--concept-counts", "2", "--preserve-retained", "--singletons", str(singletons[0])],
                           "without --preserve-retained"),
                          (["--concept-counts", "2,8", "--concepts", "dev"], "only 5 classes")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_fusion_option_reuses_the_per_concept_loras(micro_sd, tmp_path) -> None:
    """``fusion_null_space`` only changes how the per-concept LoRAs are combined: its run reloads them (and the
    null space it asks for is in its erasure)."""
    run_bench(load_model(micro_sd), ["trace"], ["circle,square"], tmp_path / "b", seeds=1, progress=False,
              options=TINY, sweep=[{"fusion_null_space": 1.0}], preserve=["star"])
    runs = tmp_path / "b" / "runs" / "circle,square"
    fuse = json.loads((runs / "trace" / "erasure" / "erasure.json").read_text())
    projected = json.loads((runs / "trace[fusion_null_space=1.0]" / "erasure" / "erasure.json").read_text())
    assert "resumed" not in fuse["trajectory_log"] and "null_space" not in fuse["fusion"]
    assert projected["trajectory_log"]["resumed"] == ["circle", "square"]
    assert projected["fusion"]["null_space"] == 1.0
    assert all(c["preserve"] == ["star"] for c in projected["concepts"])
