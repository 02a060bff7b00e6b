"""Erasure folders: atomic writes, loading, base-model checks, strength, merge."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from trace_erase import TraceEraseError, erase, get_adapter, load_erasure
from trace_erase.artifacts.erasure import LORA_WEIGHT_NAME, MANIFEST_NAME

from .conftest import BUILDERS
from .test_closed_form import _pred


@pytest.fixture(scope="module")
def sd_erasure():
    return erase(BUILDERS["sd"](), ["cat"], anchor="dog", preserve=["car"], progress=False,
                 templates=["a photo of {}", "{}"])


def test_save_load_roundtrip_and_manifest(sd_erasure, tmp_path) -> None:
    path = sd_erasure.save(tmp_path / "e")
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME, LORA_WEIGHT_NAME]
    loaded = load_erasure(path)
    m = loaded.manifest
    assert m["method"] == "trace-closed-form" and m["concepts"][0] == {"name": "cat", "anchor": "dog",
                                                                       "preserve": ["car"]}
    for key in ("config", "base_model", "versions", "timings", "memory", "certificate", "lora"):
        assert key in m
    assert len(m["base_model"]["fingerprint"]["sha256"]) == 64
    assert m["versions"]["diffusers"] and m["timings"]["wall_time_s"] > 0
    assert set(loaded.state_dict) == set(sd_erasure.state_dict)
    assert not list(tmp_path.glob(".*tmp*"))


def test_output_exists_needs_overwrite(sd_erasure, tmp_path) -> None:
    sd_erasure.save(tmp_path / "e")
    with pytest.raises(TraceEraseError, match="already exists.*--overwrite"):
        sd_erasure.save(tmp_path / "e")
    sd_erasure.save(tmp_path / "e", overwrite=True)
    assert load_erasure(tmp_path / "e").method == "trace-closed-form"


def test_failure_mid_write_leaves_nothing(sd_erasure, tmp_path, monkeypatch) -> None:
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        sd_erasure.save(tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_missing_files(sd_erasure, tmp_path) -> None:
    path = sd_erasure.save(tmp_path / "e")
    (path / LORA_WEIGHT_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(TraceEraseError, match="is corrupt"):
        load_erasure(path)
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(TraceEraseError, match="corrupt"):
        load_erasure(path)
    with pytest.raises(TraceEraseError, match="does not exist"):
        load_erasure(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(TraceEraseError, match="not an erasure folder"):
        load_erasure(tmp_path / "plain")


def test_pickle_lora_refused_unless_allowed(sd_erasure, tmp_path) -> None:
    path = sd_erasure.save(tmp_path / "e")
    (path / LORA_WEIGHT_NAME).unlink()
    torch.save(sd_erasure.state_dict, path / "pytorch_lora_weights.bin")
    with pytest.raises(TraceEraseError, match="only as pickle.*--allow-pickle"):
        load_erasure(path)
    assert set(load_erasure(path, allow_pickle=True).state_dict) == set(sd_erasure.state_dict)


def test_different_base_model_is_refused(sd_erasure) -> None:
    with pytest.raises(TraceEraseError, match="different base model"):
        sd_erasure.apply(BUILDERS["sd"](seed=1))
    with pytest.raises(TraceEraseError, match="is for a sd model"):
        sd_erasure.apply(BUILDERS["flux"]())


def test_same_base_in_half_precision_is_accepted(sd_erasure) -> None:
    pipe = BUILDERS["sd"]().to(torch.float16)
    sd_erasure.check_base(pipe)  # no error: the same weights, rounded


def test_base_model_is_not_modified_and_scale_controls_strength(sd_erasure) -> None:
    pipe = BUILDERS["sd"]()
    adapter = get_adapter(pipe)
    module = sd_erasure.modules[0]
    w0 = adapter.module(module).weight.detach().clone()
    base = _pred(adapter, ["a photo of a cat"])
    name = sd_erasure.apply(pipe, scale=0.0).adapter_name
    assert torch.allclose(_pred(adapter, ["a photo of a cat"]), base, atol=1e-6)
    pipe.set_adapters([name], adapter_weights=[1.0])
    full = _pred(adapter, ["a photo of a cat"])
    pipe.set_adapters([name], adapter_weights=[0.5])
    half = _pred(adapter, ["a photo of a cat"])
    assert (full - base).abs().max() > 1e-5
    assert 0 < (half - base).norm() < (full - base).norm()
    assert torch.equal(adapter.module(module).weight, w0)  # the base layer itself never changes


def test_merge_equals_applied(sd_erasure, tmp_path) -> None:
    applied = BUILDERS["sd"]()
    sd_erasure.apply(applied)
    merged = BUILDERS["sd"]()
    sd_erasure.merge_into(merged)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    prompts = ["a photo of a cat", "a red car"]
    a, b = _pred(get_adapter(applied), prompts), _pred(get_adapter(reloaded), prompts)
    assert (a - b).abs().max() < 1e-4
    assert not json.loads((tmp_path / "merged" / "model_index.json").read_text()).get("_lora")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["lora"].pop("prefix"), "lora.prefix is missing"),
    (lambda m: m["lora"].update(rank="four"), "lora.rank must be an integer"),
    (lambda m: m["base_model"].update(family="sd9"), "base_model.family must be one of"),
    (lambda m: m.update(gate={"tau": 0.5, "weight_name": "../../outside.safetensors"}), "gate.weight_name must be"),
    (lambda m: m["lora"].update(weight_name="/etc/passwd"), "lora.weight_name must be"),
    (lambda m: m.update(format_version=99), "newer than this trace-erase reads"),
    (lambda m: m["concepts"].append({"name": 3}), r"concepts\[1\].name must be a string"),
])
def test_manifest_schema_names_the_bad_field(sd_erasure, tmp_path, edit, message) -> None:
    path = sd_erasure.save(tmp_path / "e")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    edit(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(TraceEraseError, match=message):
        load_erasure(path)


def test_manifest_edited_after_writing_is_refused(sd_erasure, tmp_path) -> None:
    path = sd_erasure.save(tmp_path / "e")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["method"] = "uce-but-edited"  # still a valid manifest, but not what was written
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(TraceEraseError, match="modified after it was written"):
        load_erasure(path)


def test_a_format_2_erasure_and_its_yaml_config_still_load(tmp_path) -> None:
    """An erasure written before the trajectory options became typed sub-configs (format 2: flat keys such as
    ``adversarial_every``), and the YAML config that made it, load into today's nested config unchanged; the
    flat keys it stored round-trip through :meth:`TrajectoryConfig.options`."""
    from pathlib import Path

    from trace_erase.api import method_configs
    from trace_erase.config import load_yaml
    from trace_erase.engines.trajectory_config import AdversarialConfig, FusionConfig, TrajectoryConfig
    from trace_erase.methods import get_method

    data = Path(__file__).parent / "data"
    er = load_erasure(data / "format2-erasure")
    assert er.manifest["format_version"] == 2
    stored = er.manifest["config"]["trajectory"]
    cfg = TrajectoryConfig.from_options(stored)
    assert cfg.adversarial == AdversarialConfig(every=1, steps=1, lr=stored["adversarial_lr"], tokens=1,
                                                weight=stored["adversarial_weight"])
    assert cfg.fusion == FusionConfig(lam=0.1, lam_preserve=0.5) and cfg.eraseanything is None
    assert cfg.options() == stored
    yaml_cfg = load_yaml(data / "format2-config.yaml")
    _, from_yaml = method_configs(get_method(yaml_cfg["method"]), yaml_cfg["options"])
    assert from_yaml == cfg
    # the adversarial defence switched off by its flat key, and a nested mapping as a manifest of format 3 stores it
    off = {k: v for k, v in stored.items() if not k.startswith("adversarial_")} | {"adversarial_every": 0}
    assert TrajectoryConfig.from_options(off).adversarial is None
    with pytest.raises(TraceEraseError, match="adversarial_steps is read only when adversarial is on"):
        TrajectoryConfig.from_options({**off, "adversarial_steps": 1})  # an off defence's setting is not dropped
    import dataclasses

    assert TrajectoryConfig.from_options(dataclasses.asdict(cfg)) == cfg
