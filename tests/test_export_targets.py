"""--target exports: each target's readers load the file whole. diffusers is run (every module applied, checked
against the merged model); the other readers' key sets are pinned from the reader table (artifacts/readers.py), and
the table's diffusers rows are checked against diffusers itself. Companion files, --strict, and the Gram truncation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trace_erase import TraceEraseError, erase
from trace_erase.api import export_erasure
from trace_erase.artifacts.export import ExportOptions, apply_full, full_companion, read_export_record
from trace_erase.artifacts.readers import READERS, file_modules, judge
from trace_erase.artifacts.targets import TARGETS
from trace_erase.cli import main

from .conftest import BUILDERS
from .test_export import FAST, SDXL_NAMES, _handle, _visible

FAMILIES = ("sd", "sdxl", "flux")


@pytest.fixture(scope="module")
def erasures():
    """A trace erasure (stage A + always-on stage B, B made visible) per family, on the seed-0 tiny pipeline."""
    return {fam: _visible(erase(BUILDERS[fam](), ["cat"], method="trace", anchor="dog", progress=False,
                                templates=["{}", "a photo of {}"], **FAST)) for fam in FAMILIES}


def _denoiser_state(pipe) -> dict[str, torch.Tensor]:
    from trace_erase.models import get_adapter

    return {k: v.detach().double().clone() for k, v in get_adapter(pipe).denoiser.state_dict().items()}


def _diffusers_applies(fam: str, er, path) -> tuple[dict[str, float], set[str]]:
    """Load ``path`` (after its companion, if any) into a fresh pipeline with diffusers, fuse it, and compare every
    edited weight with ``er`` merged: (relative error per applied module, modules diffusers left untouched)."""
    merged = BUILDERS[fam]()
    er.merge_into(merged)
    want, base = _denoiser_state(merged), _denoiser_state(BUILDERS[fam]())
    pipe = BUILDERS[fam]()
    rec = read_export_record(path)["export"]
    if rec.get("companion"):
        apply_full(pipe, full_companion(path))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    got = _denoiser_state(pipe)
    assert set(got) == set(want)
    errors, untouched = {}, set()
    for m in er.modules:
        key = f"{m}.weight"
        change = float((want[key] - base[key]).norm())
        assert change > 0
        if torch.equal(got[key], base[key]):
            untouched.add(m)
        else:
            errors[m] = float((got[key] - want[key]).norm()) / change
    others = [k for k in got if k.removesuffix(".weight") not in er.modules]
    assert all(torch.allclose(got[k], base[k], atol=1e-6) for k in others)  # nothing else moved
    return errors, untouched


@pytest.mark.parametrize("fam,target", [("sdxl", "diffusers"), ("flux", "diffusers"), ("flux", "invokeai"),
                                        ("sdxl", "kohya"), ("sdxl", "comfyui")])
def test_stage_a_and_b_export_loads_whole_in_diffusers_against_merge(erasures, tmp_path, fam, target) -> None:
    er = erasures[fam]
    path = tmp_path / "e.safetensors"
    rec = export_erasure(er, _handle(BUILDERS[fam]()), ExportOptions(target=target), path)
    assert er.certificate["per_module"] and er.manifest["trajectory_log"]["steps"]  # stage A and stage B
    errors, untouched = _diffusers_applies(fam, er, path)
    assert not untouched, f"diffusers did not apply {sorted(untouched)}"
    assert max(errors.values()) <= 1e-5, errors
    assert next(v for v in rec["readers"] if v["reader"] == "diffusers")["status"] == "whole"


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_reader_table_row_for_diffusers_matches_diffusers(erasures, tmp_path, fam) -> None:
    """For the kohya file of each family the table's diffusers verdict (whole, or which modules it drops) is what
    diffusers does: FLUX's txt_in / vector_in are dropped without a warning, everything else is applied."""
    er = erasures[fam]
    path = tmp_path / "k.safetensors"
    export_erasure(er, _handle(BUILDERS[fam]()), ExportOptions(format="kohya", max_rank=64), path)
    fmt, names = file_modules(list(load_file(str(path))))
    verdict = judge(READERS["diffusers"], fam, fmt, names)
    errors, untouched = _diffusers_applies(fam, er, path)
    dropped = {"lora_unet_txt_in": "context_embedder",
               "lora_unet_vector_in_in_layer": "time_text_embed.text_embedder.linear_1"}
    assert untouched == {dropped[n] for n in verdict.dropped}
    assert (verdict.status, bool(untouched)) == (("partial", True) if fam == "flux" else ("whole", False))
    assert max(errors.values()) <= 1e-5


# The tiny models' module names in each file, and what each reader does with them (from the reader table).
FLUX_KOHYA = ["lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
FLUX_PEFT = ["transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1",
             "transformer.transformer_blocks.0.attn.add_k_proj", "transformer.transformer_blocks.0.attn.add_v_proj"]
FLUX_PEFT_INVOKE = FLUX_PEFT + ["transformer.transformer_blocks.0.attn.add_q_proj",
                                "transformer.single_transformer_blocks.0.attn.to_q"]
SD_PEFT = [f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_{p}" for p in "kv"]
SDXL_PEFT = [f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_{p}" for p in "kv"] + [
    "unet.add_embedding.linear_1"]
SD_KOHYA_REAL = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_up_blocks_3_resnets_2_conv1", "lora_unet_conv_in", "lora_unet_conv_norm_out"]
EXPECTED = [  # (reader, family, format, names, status, dropped)
    ("comfyui", "sdxl", "kohya", sorted(SDXL_NAMES), "whole", []),
    ("a1111", "sdxl", "kohya", sorted(SDXL_NAMES), "whole", []),
    ("forge", "sdxl", "kohya", sorted(SDXL_NAMES), "whole", []),
    ("invokeai", "sdxl", "kohya", sorted(SDXL_NAMES), "whole", []),
    ("sd-scripts", "sdxl", "kohya", sorted(SDXL_NAMES), "partial", ["lora_unet_label_emb_0_0"]),
    ("sd-scripts-diffusers", "sdxl", "kohya", sorted(SDXL_NAMES), "refused", ["lora_unet_label_emb_0_0"]),
    ("comfyui", "flux", "kohya", FLUX_KOHYA, "whole", []),
    ("forge", "flux", "kohya", FLUX_KOHYA, "whole", []),
    ("sd-scripts", "flux", "kohya", FLUX_KOHYA, "whole", []),
    ("invokeai", "flux", "kohya", FLUX_KOHYA, "refused", FLUX_KOHYA[1:]),
    ("a1111", "flux", "kohya", FLUX_KOHYA, "none", FLUX_KOHYA),
    ("invokeai", "flux", "diffusers", FLUX_PEFT, "refused", FLUX_PEFT_INVOKE[-2:][::-1]),
    ("invokeai", "flux", "diffusers", FLUX_PEFT_INVOKE, "whole", []),
    ("comfyui", "flux", "diffusers", FLUX_PEFT, "whole", []),
    ("sd-scripts", "flux", "diffusers", FLUX_PEFT, "partial", FLUX_PEFT),
    ("comfyui", "sd", "diffusers", SD_PEFT, "partial", SD_PEFT),
    ("comfyui", "sdxl", "diffusers", SDXL_PEFT, "partial", SDXL_PEFT[:2]),
    ("a1111", "sd", "diffusers", SD_PEFT, "partial", SD_PEFT),
    ("invokeai", "sd", "diffusers", SD_PEFT, "refused", SD_PEFT),
    ("forge", "sdxl", "diffusers", SDXL_PEFT, "partial", SDXL_PEFT[:2]),
    ("a1111", "sd", "kohya", SD_KOHYA_REAL, "partial", ["lora_unet_conv_norm_out"]),
    ("sd-scripts", "sd", "kohya", SD_KOHYA_REAL, "partial", ["lora_unet_conv_in", "lora_unet_conv_norm_out"]),
    ("sd-scripts-diffusers", "sd", "kohya", SD_KOHYA_REAL, "refused",
     ["lora_unet_conv_in", "lora_unet_conv_norm_out"]),
]


@pytest.mark.parametrize("reader,fam,fmt,names,status,dropped", EXPECTED,
                         ids=[f"{r}-{f}-{m}-{len(n)}" for r, f, m, n, _, _ in EXPECTED])
def test_reader_table_pins_each_readers_key_set(reader, fam, fmt, names, status, dropped) -> None:
    v = judge(READERS[reader], fam, fmt, names)
    assert (v.status, v.dropped) == (status, dropped)


def test_forge_refuses_a_file_past_twelve_unmatched_keys() -> None:
    names = [f"unet.down_blocks.0.attentions.0.transformer_blocks.{i}.attn2.to_k" for i in range(7)]
    assert judge(READERS["forge"], "sd", "diffusers", names[:6]).status == "partial"  # 12 tensors
    assert judge(READERS["forge"], "sd", "diffusers", names).status == "refused"  # 14 tensors


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_target_writes_what_its_readers_load_whole(erasures, tmp_path, target, fam) -> None:
    er = erasures[fam]
    path = tmp_path / "e.safetensors"
    if fam not in TARGETS[target].formats:
        with pytest.raises(TraceEraseError, match=f"--target {target} has no LoRA loader for {fam}"):
            export_erasure(er, _handle(BUILDERS[fam]()), ExportOptions(target=target), path)
        assert not list(tmp_path.iterdir())
        return
    rec = export_erasure(er, _handle(BUILDERS[fam]()), ExportOptions(target=target, precision="fp16"), path)
    fmt, names = file_modules(list(load_file(str(path))))
    assert fmt == TARGETS[target].formats[fam] == rec["format"]
    for reader in TARGETS[target].readers_for(fam):
        assert judge(reader, fam, fmt, names).status == "whole", reader.key
    companion = set(rec.get("companion", {}).get("modules", {}))
    assert companion == ({"add_embedding.linear_1"} if (target, fam) == ("kohya", "sdxl") else set())
    invoke_flux = {"single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj"}
    assert set(rec["placeholders"]) == (invoke_flux if (target, fam) == ("invokeai", "flux") else set())
    assert full_companion(path).exists() == bool(companion)
    lora_modules = {m for m, r in rec["modules"].items() if r["kind"] == "lora"}
    assert lora_modules | companion == set(er.modules)  # with a target, nothing goes dense for its size


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sdxl_folder(erasures, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("erasure") / "sdxl"
    erasures["sdxl"].save(folder)
    return str(folder)


def test_cli_kohya_target_writes_a_companion_and_says_how_to_load_it(saved_models, sdxl_folder, tmp_path,
                                                                     capsys) -> None:
    out_file = tmp_path / "k.safetensors"
    code, out, err = _run(["export", sdxl_folder, "--model", saved_models["sdxl"], "--target", "kohya",
                           "--output", str(out_file)], capsys)
    assert code == 0, err
    companion = full_companion(out_file)
    assert set(load_file(str(companion))) == {"add_embedding.linear_1.weight"}
    assert not any("label_emb" in k for k in load_file(str(out_file)))
    assert "companion file:" in out and "kohya sd-scripts" in out and companion.name in out
    with safe_open(str(out_file), "pt") as f:
        rec = json.loads(f.metadata()["trace_erase"])["export"]
    assert rec["companion"]["modules"] == {"add_embedding.linear_1": ["kohya sd-scripts (networks/lora*.py)",
                                                                      "kohya sd-scripts lora_diffusers."
                                                                      "merge_lora_weights"]}
    assert "apply_full" in rec["companion"]["instructions"]
    code, out, _ = _run(["info", str(out_file)], capsys)
    text = " ".join(out.split())
    assert code == 0 and "export for kohya" in text and "companion file" in text
    assert "kohya sd-scripts (networks/lora*.py) 48d368f (2026-02-16): loads the file whole" in text


def test_cli_strict_refuses_naming_module_and_reader_before_writing(saved_models, sdxl_folder, tmp_path,
                                                                    capsys) -> None:
    code, _, err = _run(["export", sdxl_folder, "--model", saved_models["sdxl"], "--target", "kohya", "--strict",
                         "--output", str(tmp_path / "k.safetensors")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "add_embedding.linear_1" in err and "sd-scripts" in err and "--strict" in err
    assert not list(tmp_path.iterdir())


def test_cli_info_says_which_reader_drops_what(saved_models, sdxl_folder, tmp_path, capsys) -> None:
    path = tmp_path / "k.safetensors"
    code, _, err = _run(["export", sdxl_folder, "--model", saved_models["sdxl"], "--format", "kohya",
                         "--max-rank", "64", "--output", str(path)], capsys)
    assert code == 0, err
    code, out, _ = _run(["info", str(path)], capsys)
    text = " ".join(out.split())
    assert "(networks/lora*.py) 48d368f (2026-02-16): drops 1 module(s) silently: lora_unet_label_emb_0_0" in text
    assert "merge_lora_weights 48d368f (2026-02-16): refuses the file" in text
    assert "ComfyUI 0.3.64: loads the file whole" in text


@pytest.mark.parametrize("extra,message", [
    (["--target", "photoshop"], "unknown --target 'photoshop'"),
    (["--target", "comfyui", "--format", "kohya"], "--target comfyui picks the format"),
    (["--strict"], "--strict needs --target"),
    (["--truncation", "qr"], "unknown --truncation"),
])
def test_cli_target_bad_input_is_one_line(saved_models, tmp_path, capsys, extra, message) -> None:
    code, _, err = _run(["export", str(tmp_path / "missing"), "--model", saved_models["sd"],
                         "--output", str(tmp_path / "x.safetensors"), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_gram_truncation_is_the_best_rank_r_edit_in_the_solves_metric(tmp_path) -> None:
    """In G = λI + G_e + λ_p G_p the Gram-weighted export reaches the Eckart–Young optimum of ΔW G^{1/2}; plain SVD
    does not — and neither would a dropped (= SVD) or inverted (G^{-1/2}) weighting."""
    from trace_erase.config import config_from_dict, make_concepts
    from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
    from trace_erase.models import get_adapter

    pipe = BUILDERS["sd"]()
    templates = ["{}", "a photo of {}", "a painting of {}"]
    er = erase(pipe, ["cat"], anchor="dog", preserve=["car"], progress=False, templates=templates)
    adapter = get_adapter(pipe)
    cfg = config_from_dict(ClosedFormConfig, er.manifest["config"]["closed_form"], "test")
    engine = ClosedFormEngine(adapter, cfg, progress=False)
    stats = engine.statistics(make_concepts(er.manifest["concepts"]))
    deltas = er.deltas()
    rank = 2
    files = {}
    for truncation in ("gram", "svd"):
        files[truncation] = tmp_path / f"{truncation}.safetensors"
        rec = export_erasure(er, _handle(pipe), ExportOptions(format="diffusers", max_rank=rank,
                                                              truncation=truncation), files[truncation])
        assert {r["truncation"] for r in rec["modules"].values()} == {truncation}
        files[truncation] = (load_file(str(files[truncation])), rec)
    gains = []
    for stream in engine.streams:
        st = stats[stream.name]
        g = cfg.lambda_reg * torch.eye(st.dim, dtype=torch.float64) + st.g_e + cfg.lambda_preserve * st.g_p
        evals, evecs = torch.linalg.eigh(g)
        root = (evecs * evals.sqrt()) @ evecs.T
        for m in stream.modules:
            exact = deltas[m]
            s = torch.linalg.svdvals(exact @ root)
            optimum = float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
            err = {}
            for truncation, (sd, _) in files.items():
                got = sd[f"unet.{m}.lora_B.weight"].double() @ sd[f"unet.{m}.lora_A.weight"].double()
                err[truncation] = float(((got - exact) @ root).norm() / (exact @ root).norm())
            assert err["gram"] == pytest.approx(optimum, rel=1e-4, abs=1e-7)
            assert err["svd"] > optimum * 1.05
            gains.append(err["svd"] / err["gram"])
    cert = {t: rec["certificate"] for t, (_, rec) in files.items()}
    for m in cert["gram"]:  # the erasure residual of the Gram export is closer to the exact edit's
        exact_res = cert["gram"][m]["exact"]["erasure_residual"]
        assert abs(cert["gram"][m]["exported"]["erasure_residual"] - exact_res) < \
            abs(cert["svd"][m]["exported"]["erasure_residual"] - exact_res)
    assert min(gains) > 1.05
