"""Benchmark scripts keep the CLI's convention: bad input is one line on stderr and exit 2, before a model loads."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def from_benchmarks(module: str, name: str) -> Any:
    """``name`` from the script ``benchmarks/<module>.py`` (scripts import their neighbours as top-level modules)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return getattr(importlib.import_module(module), name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, args, says", [
    ("merge_bench.py", ["missing/bench.json", "--output", "merged"], "not found: missing/bench.json"),
    ("attacks.py", ["--attacks", "no-such-attack", "--output", "out"], "no-such-attack"),
    ("attacks.py", ["--saved-only", "--output", "out"], "run the matrix without --saved-only first"),
    ("attacks.py", ["--focus", "trace-now", "--output", "out"], "--focus trace-now is not among --methods"),
    ("stage_a_residual.py", ["--runs", "nope", "--output", "o.json"], "nope holds no erasure/erasure.json"),
    ("toy_vae_probe.py", ["--set", "no_such_key=1", "--output", "pipe", "--micro"], "no_such_key"),
    ("scene_side_probe.py", ["missing"], "no folder 'missing'"),
    ("scene_side_probe.py", ["."], "neither a training run's .partial folder nor a toy pipeline"),
    ("paired.py", ["missing/bench.json", "--focus", "trace"], "'missing/bench.json' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(name: str, args: list[str], says: str, tmp_path: Path) -> None:
    done = script(name, *args, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "bad input left output behind"


def test_write_json_replaces_a_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    write_json = from_benchmarks("_script", "write_json")
    target = tmp_path / "figures.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(TypeError):  # not serialisable: fails before a byte is written
        write_json(target, {"value": object()})
    assert json.loads(target.read_text()) == {"old": True}
    write_json(target, {"rows": [1, 2]})
    assert json.loads(target.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]


def test_two_attack_matrices_sharing_an_output_keep_each_others_rows(tmp_path: Path) -> None:
    SavedRows = from_benchmarks("attacks", "SavedRows")
    run = {"pre_asr": 1.0, "asr": 0.5, "base_rate": 1.0, "base_asr": 1.0, "timings": {"total_s": 3.0}}
    path = tmp_path / "rows.json"
    first, second = (SavedRows(path, "toy-sd", 5, {"paraphrase": {"budget": 8}}, {}) for _ in range(2))
    first.put("circle", "trace", "paraphrase", run)  # each process loaded rows.json before the other wrote
    second.put("square", "trace", "paraphrase", run)
    first.put_erase("circle", "trace", 12.0)
    on_disk = json.loads(path.read_text())
    assert set(on_disk["rows"]) == {"circle|trace|paraphrase", "square|trace|paraphrase"}
    assert on_disk["erase_s"] == {"circle|trace": 12.0}
    assert SavedRows(path, "toy-sd", 5, {"paraphrase": {"budget": 8}}, {}).get("square", "trace", "paraphrase")


def test_a_partial_attack_run_keeps_the_wider_table_it_shares_an_output_with(tmp_path: Path) -> None:
    covers_more = from_benchmarks("attacks", "covers_more")
    table = tmp_path / "attacks.json"
    assert covers_more(table, ["circle"], ["base", "trace"], ["p4d"]) == ""  # no table yet: write it
    table.write_text(json.dumps({"classes": ["circle", "cross"], "methods": ["base", "ant", "trace"],
                                 "attacks": ["p4d"]}))
    assert covers_more(table, ["circle", "cross"], ["base", "ant", "trace"], ["p4d"]) == ""  # the same matrix
    assert covers_more(table, ["circle", "cross", "house"], ["base", "ant", "trace", "trce"], ["p4d"]) == ""
    assert covers_more(table, ["circle"], ["base", "trce"], ["p4d"]) == "classes cross; methods ant, trace"


def test_attack_gaps_pair_trace_with_the_lowest_other_method_class_by_class() -> None:
    gaps = from_benchmarks("attacks", "gaps")
    classes = ["circle", "square", "cross", "star"]
    spread = [0.1, 0.9, 0.3, 0.7]  # classes differ a lot; the methods differ by a constant
    asr = {"trace": [v - 0.1 for v in spread], "ant": spread, "uce": [min(v + 0.1, 1.0) for v in spread],
           "base": [1.0] * 4}
    pre = {"trace": [0.2, 0.0, 0.1, 0.3], "ant": [0.0, 0.1, 0.0, 0.1], "uce": [0.5] * 4, "base": [1.0] * 4}
    rows = {}
    for m in asr:
        for i, c in enumerate(classes):
            rows[(c, m, "soft-prompt")] = ({"base_rate": pre[m][i], "base_asr": asr[m][i]} if m == "base"
                                           else {"pre_asr": pre[m][i], "asr": asr[m][i]})
    out = gaps(rows, classes, ["base", "uce", "ant", "trace"], ["soft-prompt"])
    soft = out["soft-prompt"]
    assert soft["other"] == "ant"  # the lowest other method, not the first listed nor the base
    assert soft["mean"] == pytest.approx(-0.1)
    assert soft["ci"] == pytest.approx((-0.1, -0.1))  # paired: the classes' spread cancels
    no_attack = out["no attack"]
    assert no_attack["other"] == "ant" and no_attack["mean"] == pytest.approx(0.1)
    assert no_attack["ci"][0] < no_attack["mean"] < no_attack["ci"][1]
    # another focus (a variant of trace): ant is now measured against the lowest of the rest, trace among them
    focused = gaps(rows, classes, ["base", "uce", "ant", "trace"], ["soft-prompt"], focus="ant")["soft-prompt"]
    assert focused["other"] == "trace" and focused["mean"] == pytest.approx(0.1)


def test_paired_script_pairs_rows_across_benches_of_one_suite(tmp_path: Path) -> None:
    def bench(path: Path, methods: dict[str, int], seeds: int = 4) -> None:
        rows = [{"concept": c, "method": m, "status": "ok",
                 "units": [{"seed": k, "hits": {"erased": 0, "other": kept, "synonym": 0},
                            "n": {"erased": 1, "other": 9, "synonym": 1}, "drift": [0.1]} for k in range(seeds)]}
                for m, kept in methods.items() for c in ("circle", "star")]
        path.write_text(json.dumps({"model": "toy-sd", "suite": "toy-objects", "seeds_per_prompt": seeds,
                                    "rows": rows}))

    bench(tmp_path / "a.json", {"trace": 8, "esd-x": 6})
    bench(tmp_path / "b.json", {"trace[reference=anchor]": 9})
    done = script("paired.py", "a.json", "b.json", "--focus", "trace", "--json", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = {r["other"]: r for r in json.loads((tmp_path / "out.json").read_text())["records"]}
    assert set(records) == {"esd-x", "trace[reference=anchor]"}
    assert records["esd-x"]["headline"]["mean"] > 0 > records["trace[reference=anchor]"]["headline"]["mean"]
    bench(tmp_path / "c.json", {"ant": 7}, seeds=3)
    done = script("paired.py", "a.json", "c.json", "--focus", "trace", cwd=tmp_path)
    assert done.returncode == 2 and "seeds_per_prompt" in done.stderr
    # --seeds pairs the first seeds of both: a's seed 3 (where trace keeps 0 of 9) is left out
    rows = json.loads((tmp_path / "a.json").read_text())
    for r in rows["rows"]:
        if r["method"] == "trace":
            r["units"][3]["hits"]["other"] = 0
    (tmp_path / "a.json").write_text(json.dumps(rows))
    done = script("paired.py", "a.json", "c.json", "--focus", "trace", "--against", "ant", "--seeds", "3",
                  "--json", "out3.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (record,) = json.loads((tmp_path / "out3.json").read_text())["records"]
    full = script("paired.py", "a.json", "c.json", "--focus", "trace", "--seeds", "4", cwd=tmp_path)
    assert full.returncode == 2 and "fewer than --seeds 4" in full.stderr
    assert record["headline"]["mean"] > 0  # trace (8 of 9 kept) ahead of ant (7 of 9) on seeds 0..2


def test_paired_script_reads_a_multi_benchs_kept_set_rows(tmp_path: Path) -> None:
    """A multi bench keeps only ``N*/set*/set_rows.json`` in git; its rows (with per-seed units) pair as a bench's."""
    def unit(seed: int, kept: int) -> dict:
        return {"seed": seed, "hits": {"erased": 0, "other": kept, "synonym": 0},
                "n": {"erased": 1, "other": 8, "synonym": 1}, "drift": [0.1]}

    (tmp_path / "multi.json").write_text(json.dumps({"model": "toy-sd"}))
    for k, group in enumerate((["circle", "star"], ["heart", "star"])):
        folder = tmp_path / "N2" / f"set{k}"
        folder.mkdir(parents=True)
        rows = [{"row": {"concept": ",".join(group), "method": m, "status": "ok",
                         "units": [unit(s, kept) for s in range(3)]}, "per_class_acc_e": {}}
                for m, kept in (("trace", 7), ("trace[multi=joint]", 5))]
        (folder / "set_rows.json").write_text(json.dumps({"group": group, "rows": rows}))
    done = script("paired.py", "N2/set0/set_rows.json", "N2/set1/set_rows.json", "--focus", "trace", "--json",
                  "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (record,) = json.loads((tmp_path / "out.json").read_text())["records"]
    assert record["classes"] == ["circle,star", "heart,star"] and record["headline"]["mean"] > 0
