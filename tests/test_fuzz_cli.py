"""Property-based fuzzing of the command line: whatever a user types, a command ends with exit 0 or exit 2, never a
traceback, at most 3 lines on stderr when it fails, and no output (or temporary) folder left behind on exit 2.

Runs in-process against a tiny SD pipeline folder and an erasure made for it; the example budget keeps it to about a
minute on 2 cores (``FUZZ_EXAMPLES`` raises it for a longer local run; ``FUZZ_LOG=FILE`` appends each
example's exit code and last stderr line there).
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_erase import erase
from trace_erase.cli import main
from trace_erase.engines.closed_form import ClosedFormConfig
from trace_erase.engines.trajectory import TrajectoryConfig

from .conftest import BUILDERS

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
OPTION_KEYS = sorted({*ClosedFormConfig.__dataclass_fields__, *TrajectoryConfig.option_keys()})

# strings a user might type where a concept, a path or a value goes: empty, blank, over-long, non-ASCII, control chars
texts = st.one_of(
    st.sampled_from(["", " ", "\t", "cat", "a photo of a cat", "x" * 400, "猫", "café crème", "cat\x00dog",
                     "line\nbreak", "\x1b[31mred", "../../etc", "{}", "[", "null", "-1", "nan"]),
    st.text(max_size=12),
)
values = st.one_of(
    st.integers(-3, 4).map(str), st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["null", "true", "abc", "[a, b]", "[", "{x: 1}", "'", "1e309", "-0", ""]), texts,
)
options = st.lists(st.tuples(st.one_of(st.sampled_from(OPTION_KEYS), texts), values), max_size=3)
flags = {
    "--device": st.sampled_from(["auto", "cpu", "cuda", "cuda:7", "mps", "gpu", ""]),
    "--dtype": st.sampled_from(["auto", "fp32", "bf16", "fp16", "float8", ""]),
    "--offload": st.sampled_from(["none", "model", "text-encoders", "disk"]),
    "--batch-size": st.integers(-2, 3).map(str),
    "--scheduler": st.sampled_from(["model", "ddim", "euler", "euler-a", "dpm++", "lms", ""]),
    "--steps": st.integers(-1, 2).map(str),
    "--seeds": st.integers(-1, 1).map(str),
    "--scale": values,
    "--anchor": texts,
    "--preserve": texts,
    "--gate-tau": values,
    "--concept": texts,
    "--bogus": texts,
    "--scorer": st.one_of(st.sampled_from(["toy", "nudenet", "clip", "clip:/nonexistent", "face:", "imagenet:x",
                                           "toy:/tmp", "nudenet:x", "vgg:y", ":"]), texts),
    "--prompts": st.one_of(st.sampled_from(["/nonexistent.csv", "/etc/hostname", "/"]), texts),
    "--classes": st.one_of(st.sampled_from(["cifar10", "imagenette", "toy", "/nonexistent.json"]), texts),
    "--retained": texts,
    "--gallery": texts,
    "--class-map": texts,
    "--threshold": values,
    "--reference": texts,
    "--format": st.sampled_from(["kohya", "diffusers", "full", "onnx", ""]),
    "--target": st.sampled_from(["comfyui", "a1111", "forge", "invokeai", "kohya", "diffusers", "gimp", ""]),
    "--truncation": st.sampled_from(["gram", "svd", "qr", ""]),
    "--max-rank": st.integers(-1, 3).map(str),
    "--precision": st.sampled_from(["fp32", "fp16", "bf16", "fp8", ""]),
}
RUNTIME = ["--device", "--dtype", "--offload"]
EVAL = ["--scorer", "--prompts", "--classes", "--retained", "--gallery", "--class-map", "--threshold", "--reference"]
FLAGS = {  # what each command takes (and --bogus, which none does)
    "erase": [*RUNTIME, "--anchor", "--preserve", "--gate-tau", "--concept", "--format", "--max-rank", "--bogus"],
    "export": ["--device", "--dtype", "--format", "--target", "--truncation", "--max-rank", "--precision", "--bogus"],
    "generate": [*RUNTIME, "--batch-size", "--scheduler", "--steps", "--scale", "--bogus"],
    "eval": [*RUNTIME, "--batch-size", "--scheduler", "--seeds", "--scale", "--concept", "--bogus", *EVAL],
    "bench": [*RUNTIME, "--batch-size", "--scheduler", "--seeds", "--bogus", *EVAL],
    "rescore": ["--device", "--scorer", "--threshold", "--reference", "--bogus"],
    "merge": ["--device", "--dtype", "--scale", "--bogus"],
    "info": ["--bogus"],
}
COMMANDS = tuple(FLAGS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "tiny-sd"
    BUILDERS["sd"]().save_pretrained(model)
    er = erase(BUILDERS["sd"](), ["cat"], method="uce", progress=False)
    er.save(root / "erasure")
    return {"model": str(model), "erasure": str(root / "erasure"), "root": str(root)}


def _argv(command: str, data: st.DataObject, world: dict[str, str], out: str) -> list[str]:
    model = data.draw(st.sampled_from([world["model"], world["model"], "toy-nope", "", "/nonexistent", "a/b/c"]))
    erasure = data.draw(st.sampled_from([world["erasure"], world["erasure"], world["model"], "/nonexistent", ""]))
    concept = ["--concept", data.draw(st.one_of(st.just("cat"), texts))]
    method = data.draw(st.sampled_from(["uce", "trace-closed-form", "esd-x", "trace", "mace-cfr", "bogus"]))
    fast = ["--option", "templates=['{}']"] if method.startswith("trace") else []
    if method in ("esd-x", "trace"):  # keep stage B to a few tiny steps
        fast += ["--option", "steps=2", "--option", "rollout_steps=2", "--option", "pool_trajectories=1"]
    base = {
        "erase": ["erase", "--model", model, "--output", out, "--method", method, *concept, *fast],
        "generate": ["generate", "--model", model, "--output", out, "--prompt", data.draw(texts), "--steps", "2",
                     *(["--erasure", erasure] if data.draw(st.booleans()) else [])],
        "eval": ["eval", "--model", model, "--output", out, "--seeds", "1", *concept,
                 *(["--erasure", erasure] if data.draw(st.booleans()) else []),
                 "--suite", data.draw(st.sampled_from(["toy-objects", "toy-styles", "nudity", "coco", "objects",
                                                       "celebrities", "styles", ""]))],
        "bench": ["bench", "--model", model, "--output", out, "--seeds", "1",
                  "--methods", data.draw(st.sampled_from(["uce", "uce,bogus", "", ","])),
                  "--concepts", data.draw(st.sampled_from(["circle", "all", "", "cat", "circle,circle"])),
                  "--suite", data.draw(st.sampled_from(["toy-objects", "toy-styles", "x", "objects", "nudity"]))],
        "merge": ["merge", "--model", model, "--erasure", erasure, "--output", out],
        "info": ["info", erasure],
        "export": ["export", erasure, "--model", model, "--output",
                   out + data.draw(st.sampled_from([".safetensors", ".safetensors", "", ".bin"]))],
        "rescore": ["rescore", data.draw(st.sampled_from([world["root"], "/nonexistent", world["model"], ""])),
                    "--output", out],
    }[command]
    for key, value in data.draw(options):
        base += ["--option", f"{key}={value}"] if command in ("erase", "bench") else []
    for flag in data.draw(st.lists(st.sampled_from(FLAGS[command]), max_size=3, unique=True)):
        base += [flag, data.draw(flags[flag])]
    return base


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), data=st.data())
def test_cli_never_tracebacks(world: dict[str, str], command: str, data: st.DataObject) -> None:
    folder = Path(world["root"]) / uuid.uuid4().hex[:10]
    folder.mkdir()
    out = str(folder / "o")
    argv = _argv(command, data, world, out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - anything escaping main is the bug this test looks for
            pytest.fail(f"{argv!r} raised:\n{traceback.format_exc()}")
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    if os.environ.get("FUZZ_LOG"):
        with open(os.environ["FUZZ_LOG"], "a") as log:
            log.write(f"{code} {command} {lines[-1][:150] if lines else ''}\n")
    assert code in (0, 2), (argv, code, lines)
    assert not any("Traceback" in ln for ln in lines), (argv, lines)
    if code == 2:
        assert 1 <= len(lines) <= 3, (argv, lines)
        left = sorted(p.name for p in folder.iterdir())
        if "--resume" in lines[-1]:  # stage B finished but its export failed: the message names the kept progress
            left = [n for n in left if not n.endswith(".partial")]
        assert left == [], (argv, lines)  # no output, temp or partial folder
