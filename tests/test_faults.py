"""Fault injection: SIGKILL long commands at several points, then ``--resume`` (or the same command again, for toy
training) must finish with the uninterrupted run's results; corrupt files get one line and are left as they are.

Kill points are drawn once from a seeded RNG (so a failure reproduces) and injected by wrapping a function in the
child process: after its N-th call returns, the process kills itself with SIGKILL — no cleanup handler runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trace_erase import erase
from trace_erase.artifacts.checkpoint import load_checkpoint
from trace_erase.cli import main

from .conftest import BUILDERS

ROOT = str(Path(__file__).resolve().parent.parent)
RNG = random.Random(2026)
KILL = textwrap.dedent('''
    import importlib, os, signal, sys
    sys.path.insert(0, {root!r})
    owner = importlib.import_module({module!r})
    for part in {owner!r}.split(".") if {owner!r} else []:
        owner = getattr(owner, part)
    original = getattr(owner, {name!r})
    calls = [0]
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, {name!r}, wrapped)
    from trace_erase.cli import main
    sys.exit(main({argv!r}))
''')
# the child computes with the same thread count as this process: float reductions then round the same way, so a
# resumed run can be compared bit for bit with one that ran here
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}


def killed(argv: list[str], module: str, owner: str, name: str, n: int) -> subprocess.CompletedProcess:
    """Run the CLI in a child process that SIGKILLs itself after the n-th call of ``module.owner.name``."""
    script = KILL.format(root=ROOT, module=module, owner=owner, name=name, n=n, argv=argv)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("faults")
    BUILDERS["sd"]().save_pretrained(root / "tiny-sd")
    erase(BUILDERS["sd"](), ["circle"], method="uce", progress=False).save(root / "erasure")
    return {"model": str(root / "tiny-sd"), "erasure": str(root / "erasure"), "root": str(root)}


# ---- erase, stage B -------------------------------------------------------------------------------------------------
ERASE_OPTIONS = ["--option", "templates=['{}']", "--option", "steps=7", "--option", "rollout_steps=4",
                 "--option", "pool_trajectories=2", "--option", "refresh_every=3", "--option", "batch_size=2",
                 "--option", "checkpoint_every=2"]
ERASE_KILLS = [("torch.optim", "AdamW", "step", n) for n in sorted(RNG.sample(range(1, 7), 3))] + \
    [("trace_erase.engines.trajectory", "TrajectoryEngine", "rollout", 3)]  # inside a pool refresh


@pytest.fixture(scope="module")
def erase_reference(world: dict[str, str]) -> dict[str, torch.Tensor]:
    out = Path(world["root"]) / "erase-ref"
    assert main(["erase", "--model", world["model"], "--concept", "cat", "--method", "trace", "--output", str(out),
                 "--device", "cpu", *ERASE_OPTIONS]) == 0
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("point", ERASE_KILLS, ids=lambda p: f"{p[2]}#{p[3]}")
def test_erase_killed_then_resumed_is_bit_identical(point, world, erase_reference, tmp_path) -> None:
    out = tmp_path / "e"
    argv = ["erase", "--model", world["model"], "--concept", "cat", "--method", "trace", "--output", str(out),
            "--device", "cpu", *ERASE_OPTIONS]
    proc = killed(argv, *point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # nothing at the final path until the run is complete
    assert main([*argv, "--resume"]) == 0
    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert got.keys() == erase_reference.keys()
    for k, v in erase_reference.items():
        assert torch.equal(got[k], v), k
    assert not (tmp_path / "e.partial").exists()


# ---- eval -----------------------------------------------------------------------------------------------------------
# pipeline calls: 4 batches of the base model, then 4 of the erasure — one kill drawn in each phase
EVAL_KILLS = [RNG.randint(1, 4), RNG.randint(5, 7)]


def _eval_argv(world: dict[str, str], out: Path) -> list[str]:
    return ["eval", "--model", world["model"], "--erasure", world["erasure"], "--concept", "circle", "--seeds", "1",
            "--batch-size", "4", "--device", "cpu", "--output", str(out)]


@pytest.fixture(scope="module")
def eval_reference(world: dict[str, str]) -> Path:
    out = Path(world["root"]) / "eval-ref"
    assert main(_eval_argv(world, out)) == 0
    return out


@pytest.mark.parametrize("n", EVAL_KILLS)
def test_eval_killed_then_resumed_gives_the_same_results(n, world, eval_reference, tmp_path) -> None:
    out = tmp_path / "ev"
    proc = killed(_eval_argv(world, out), "diffusers", "StableDiffusionPipeline", "__call__", n)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and (tmp_path / "ev.partial").exists()
    assert main(_eval_argv(world, out)) == 2  # an interrupted run is not silently discarded
    assert main([*_eval_argv(world, out), "--resume"]) == 0
    ref, got = (json.loads((d / "results.json").read_text()) for d in (eval_reference, out))
    assert got["metrics"] == ref["metrics"] and got["prompts"] == ref["prompts"]
    for png in sorted((eval_reference / "images").rglob("*.png")):
        assert (out / png.relative_to(eval_reference)).read_bytes() == png.read_bytes(), png.name
    assert not (tmp_path / "ev.partial").exists()


# ---- bench ----------------------------------------------------------------------------------------------------------
VOLATILE = ("erase_s", "peak_rss_mb")
BENCH_KILLS = [("trace_erase.benchmark.bench", "", "_write_json", RNG.randint(2, 6))] + \
    [("diffusers", "StableDiffusionPipeline", "__call__", 3)]  # in the middle of a run


def _bench_argv(world: dict[str, str], out: Path) -> list[str]:
    return ["bench", "--model", world["model"], "--methods", "uce,trace-closed-form", "--concepts", "circle,star",
            "--seeds", "1", "--device", "cpu", "--option", "templates=['{}']", "--output", str(out)]


def _table(out: Path) -> list[dict]:
    rows = json.loads((out / "bench.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def bench_reference(world: dict[str, str]) -> list[dict]:
    out = Path(world["root"]) / "bench-ref"
    assert main(_bench_argv(world, out)) == 0
    return _table(out)


@pytest.mark.parametrize("point", BENCH_KILLS, ids=lambda p: f"{p[2]}#{p[3]}")
def test_bench_killed_then_resumed_gives_the_same_table(point, world, bench_reference, tmp_path) -> None:
    out = tmp_path / "b"
    proc = killed(_bench_argv(world, out), *point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    assert main([*_bench_argv(world, out), "--resume"]) == 0
    assert _table(out) == bench_reference


def test_bench_records_a_failed_run_and_finishes_the_others(world, tmp_path, monkeypatch) -> None:
    """One bad (method, concept) is a failed row with its reason; the other runs still complete."""
    import trace_erase.api as api

    original = api.erase

    def flaky(handle, concepts, method="trace-closed-form", **kw):
        if method == "uce" and concepts == ["star"]:
            raise RuntimeError("injected failure")
        return original(handle, concepts, method=method, **kw)

    monkeypatch.setattr(api, "erase", flaky)
    assert main(_bench_argv(world, tmp_path / "b")) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["concept"], r["method"]) for r in failed] == [("star", "uce")]
    assert "injected failure" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in rows) == len(rows) - 1
    assert "star / uce: RuntimeError: injected failure" in (tmp_path / "b" / "bench.md").read_text()


# ---- toy training ---------------------------------------------------------------------------------------------------
TRAIN_KILLS = [("trace_erase.toyworld.train", "ToyTrainer", "_save", n) for n in sorted(RNG.sample(range(2, 6), 2))]


@pytest.mark.parametrize("point", TRAIN_KILLS, ids=lambda p: f"{p[2]}#{p[3]}")
def test_toy_training_killed_then_rerun_matches_uninterrupted(point, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    argv = ["toyworld", "train", "--family", "sd", "--micro"]
    assert main([*argv, "--output", str(tmp_path / "full")]) == 0
    proc = killed([*argv, "--output", str(tmp_path / "cut")], *point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "cut").exists()
    assert main([*argv, "--output", str(tmp_path / "cut")]) == 0  # the same command resumes
    a = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "cut" / "unet").state_dict()
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=1e-6), k


# ---- corrupt files --------------------------------------------------------------------------------------------------
def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flip", "truncate"])
@pytest.mark.parametrize("target", ["pytorch_lora_weights.safetensors", "erasure.json"])
def test_corrupt_erasure_is_one_line_and_left_alone(damage, target, world, tmp_path, capsys) -> None:
    import shutil

    folder = tmp_path / "erasure"
    shutil.copytree(world["erasure"], folder)
    damage(folder / target)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "gen"
    assert main(["generate", "--model", world["model"], "--erasure", str(folder), "--prompt", "a cat",
                 "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ("corrupt" in err[0] or "valid" in err[0]), err
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flip", "truncate"])
def test_corrupt_checkpoint_is_one_line_and_left_alone(damage, world, tmp_path, capsys) -> None:
    out = tmp_path / "e"
    argv = ["erase", "--model", world["model"], "--concept", "cat", "--method", "trace", "--output", str(out),
            "--device", "cpu", *ERASE_OPTIONS]
    assert killed(argv, "torch.optim", "AdamW", "step", 5).returncode == -9
    ckpt = tmp_path / "e.partial" / "trajectory_checkpoint.pt"
    assert load_checkpoint(ckpt)["step"] == 4
    damage(ckpt)
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0] and ("corrupt" in err[0] or "truncated" in err[0]), err
    assert ckpt.read_bytes() == before and not out.exists()


def test_resume_with_changed_settings_names_them(tmp_path) -> None:
    """A checkpoint from one configuration is not continued with another (it would mix them or fail on shapes)."""
    from trace_erase.engines.trajectory import TrajectoryEngine
    from trace_erase.errors import NonFiniteLossError, TraceEraseError

    options = dict(steps=6, rollout_steps=4, pool_trajectories=1, batch_size=1, checkpoint_every=2)
    original = TrajectoryEngine.loss_terms
    calls = [0]

    def nan_at_5(self, *a, **k):  # stop the run after its step-4 checkpoint
        calls[0] += 1
        terms = original(self, *a, **k)
        if calls[0] == 5:
            terms["total"] = terms["total"] * float("nan")
        return terms

    TrajectoryEngine.loss_terms = nan_at_5
    try:
        with pytest.raises(NonFiniteLossError):
            erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, workdir=tmp_path, **options)
    finally:
        TrajectoryEngine.loss_terms = original
    before = (tmp_path / "trajectory_checkpoint.pt").read_bytes()
    with pytest.raises(TraceEraseError, match=r"different settings \(trajectory\.lr, trajectory\.rank\)"):
        erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, workdir=tmp_path,
              **{**options, "lr": 1e-3, "rank": 8})
    with pytest.raises(TraceEraseError, match=r"different settings \(concepts\)"):
        erase(BUILDERS["sd"](), ["dog"], method="esd-x", progress=False, workdir=tmp_path, **options)
    assert (tmp_path / "trajectory_checkpoint.pt").read_bytes() == before
    resumed = erase(BUILDERS["sd"](), ["cat"], method="esd-x", progress=False, workdir=tmp_path,
                    **{**options, "checkpoint_every": 3})  # does not change the weights: allowed
    assert resumed.manifest["trajectory_log"]["steps"] == 6


def test_commit_over_an_existing_folder_is_one_swap(tmp_path) -> None:
    from trace_erase.io import commit_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    commit_folder(tmp_path / "new", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_loading_uses_dtype_not_the_deprecated_torch_dtype(world) -> None:
    import warnings

    from trace_erase.models import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(world["model"], device="cpu")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
