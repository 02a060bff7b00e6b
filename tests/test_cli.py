"""The command line: erase / info / generate / merge, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import re

import pytest

from trace_erase.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_erase_info_generate_merge(saved_models, tmp_path, capsys) -> None:
    model = saved_models["sd"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {model}\nmethod: uce\nconcepts: [cat]\nanchor: dog\noptions:\n  lambda_reg: 0.5\n  probe_prompts: []\n"
    )
    code, out, err = run(["erase", "--config", str(cfg), "--output", str(tmp_path / "e"),
                          "--option", "lambda_preserve=3"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "e" / "erasure.json").read_text())
    assert manifest["method"] == "uce"
    cf = manifest["config"]["closed_form"]
    assert cf["lambda_reg"] == 0.5 and cf["lambda_preserve"] == 3 and cf["token_selection"] == "last"
    assert manifest["config"]["trajectory"] is None
    code, out, _ = run(["info", str(tmp_path / "e")], capsys)
    assert code == 0 and "uce" in out and "certificate" in out
    code, out, err = run(["generate", "--model", model, "--erasure", str(tmp_path / "e"), "--prompt", "a cat",
                          "--num-images", "2", "--steps", "2", "--output", str(tmp_path / "g")], capsys)
    assert code == 0, err
    gen = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert [r["seed"] for r in gen["images"]] == [0, 1] and gen["steps"] == 2 and gen["scale"] == 1.0
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    code, out, err = run(["merge", "--model", model, "--erasure", str(tmp_path / "e"),
                          "--output", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--concept", ""], "concept is empty"),
        (["--concept", "cat", "--anchor", "cat"], "anchor equals the concept"),
        (["--concept", " ".join(["word"] * 80)], "shorten it"),
        (["--concept", "cat", "--method", "nope"], "unknown method 'nope'; available: trace, trace-closed-form"),
        (["--concept", "cat", "--option", "bogus=1"], "unknown options for 'trace-closed-form' \\['bogus'\\]"),
        (["--concept", "cat", "--option", "lambda_reg=-1"], "lambda_reg must be ≥ 0"),
        (["--concept", "cat", "--option", "lambda_reg=0", "--option", "preserve_corpus=null"],
         "lambda_reg=0 needs a preserve_corpus"),
    ],
)
def test_erase_bad_input(saved_models, tmp_path, capsys, extra, message) -> None:
    code, out, err = run(["erase", "--model", saved_models["sd"], "--output", str(tmp_path / "e"), *extra], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and err.count("error:") == 1
    assert re.search(message, last), err
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


def test_erase_refuses_existing_output_and_missing_model(saved_models, tmp_path, capsys) -> None:
    (tmp_path / "e").mkdir()
    code, _, err = run(["erase", "--model", saved_models["sd"], "--concept", "cat", "--output",
                        str(tmp_path / "e")], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = run(["erase", "--model", str(tmp_path / "nope"), "--concept", "cat", "--output",
                        str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["erase", "--model", "toy-nothing", "--concept", "cat", "--output", str(tmp_path / "x")],
                       capsys)
    assert code == 2 and "available: toy-flux, toy-sd" in err


def test_generate_refuses_erasure_for_other_base(saved_models, tmp_path, capsys) -> None:
    code, _, err = run(["erase", "--model", saved_models["sd"], "--concept", "cat", "--output",
                        str(tmp_path / "e"), "--option", "templates=['{}']"], capsys)
    assert code == 0, err
    from .conftest import BUILDERS

    BUILDERS["sd"](seed=1).save_pretrained(tmp_path / "other")
    code, _, err = run(["generate", "--model", str(tmp_path / "other"), "--erasure", str(tmp_path / "e"),
                        "--prompt", "a cat", "--steps", "1", "--output", str(tmp_path / "g")], capsys)
    assert code == 2 and "different base model" in err
    assert not (tmp_path / "g").exists()
    # same weights with another scheduler (SD2-v fixture shares the seed) is the same base: accepted
    code, _, err = run(["generate", "--model", saved_models["sd2v"], "--erasure", str(tmp_path / "e"),
                        "--prompt", "a cat", "--steps", "1", "--output", str(tmp_path / "g")], capsys)
    assert code == 0, err


def test_bad_yaml_config(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [unclosed\n")
    code, _, err = run(["erase", "--config", str(cfg)], capsys)
    assert code == 2 and "not valid YAML" in err
    cfg.write_text("modle: x\n")
    code, _, err = run(["erase", "--config", str(cfg)], capsys)
    assert code == 2 and "unknown keys ['modle']" in err


def test_toyworld_train_schedule_options_reach_the_recorded_config(tmp_path, capsys) -> None:
    """--steps/--cycles/--batch override the preset, and the pipeline's sidecar records what was trained."""
    out = tmp_path / "toy"
    code, _, err = run(["toyworld", "train", "--family", "sd", "--micro", "--steps", "4", "--cycles", "2",
                        "--batch", "4", "--output", str(out)], capsys)
    assert code == 0, err
    training = json.loads((out / "trace_erase.json").read_text())["training"]
    assert (training["steps"], training["cycles"], training["batch"]) == (4, 2, 4)
    # the check's JSON carries the recipe and the training time next to the figures
    code, _, err = run(["toyworld", "check", "--model", str(out), "--seeds", "1", "--output",
                        str(tmp_path / "check.json")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "check.json").read_text())
    assert res["training"] == training and res["training_seconds"]["denoiser"] > 0
    assert len(res["object"]) == 10 and 0.0 <= res["object_mean"] <= 1.0


def test_toyworld_train_refuses_a_zero_batch(tmp_path, capsys) -> None:
    code, _, err = run(["toyworld", "train", "--family", "sd", "--micro", "--batch", "0", "--output",
                        str(tmp_path / "toy")], capsys)
    assert code == 2 and "--batch" in err and "greater than or equal to 1" in err
    assert list(tmp_path.iterdir()) == []


def test_toyworld_train_set_overrides_any_recipe_field(tmp_path, capsys) -> None:
    """--set reaches the model's shape (a 4×-downsampling VAE with 8 latent channels) and the sidecar; a bad
    --set is one line and leaves nothing behind."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "toy"
    code, _, err = run(["toyworld", "train", "--family", "flux", "--micro", "--set", "vae_channels=8,8,8",
                        "--set", "latent_channels=8", "--output", str(out)], capsys)
    assert code == 0, err
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.latent_channels == 8 and pipe.transformer.config.in_channels == 32
    assert pipe.vae_scale_factor == 4
    training = json.loads((out / "trace_erase.json").read_text())["training"]
    assert training["vae_channels"] == [8, 8, 8] and training["latent_channels"] == 8
    for bad, message in (("latent=8", "KEY one of"), ("latent_channels=8.5", "takes int like 4")):
        code, _, err = run(["toyworld", "train", "--family", "sd", "--micro", "--set", bad, "--output",
                            str(tmp_path / "bad")], capsys)
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_erase_help_lists_every_registered_method(capsys) -> None:
    """The --method help is generated from the registry: a method added there shows up without editing the CLI."""
    from trace_erase.methods import METHODS

    main(["erase", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in METHODS:
        assert re.search(rf"\b{re.escape(name)}\b", text), name


@pytest.mark.parametrize("option", ["tau=abc", "batch_size=0", "refresh_every=0", "checkpoint_every=0",
                                    "steps=1.5", "lr=-1", "templates=abc", "tau=.nan", "batch_size=["])
def test_bad_option_values_are_refused_before_loading(option, tmp_path, capsys) -> None:
    """Each option is type- and range-checked when the config is built: one line, exit 2, before any model load
    (the model here does not exist, so a later check would report that instead)."""
    code, _, err = run(["erase", "--model", str(tmp_path / "nope"), "--concept", "cat", "--method", "trace",
                        "--output", str(tmp_path / "o"), "--option", option], capsys)
    key = option.split("=")[0]
    assert code == 2 and len(err.strip().splitlines()) == 1 and key in err and "does not exist" not in err, err


@pytest.mark.parametrize("text, expected", [("1e-5", 1e-5), ("2E-4", 2e-4), ("+3e2", 300.0), (".5e1", 5.0)])
def test_exponent_numbers_without_a_dot_are_numbers(text, expected) -> None:
    """YAML 1.1 reads ``1e-5`` (no dot) as text; a float option must still take it, and a string option keeps it as
    text, while words stay refused."""
    from trace_erase.cli.common import parse_options
    from trace_erase.engines.trajectory_config import TrajectoryConfig
    from trace_erase.errors import TraceEraseError

    value = parse_options([f"lr={text}"])["lr"]
    assert TrajectoryConfig.from_options({"lr": value}).lr == pytest.approx(expected)
    with pytest.raises(TraceEraseError, match="lr"):
        TrajectoryConfig.from_options({"lr": "1e-5x"})
