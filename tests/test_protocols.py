"""The evaluation protocols end to end: every suite with its scorer (tiny real-class CLIP, a tiny ONNX / transformers
face model with a gallery, a TorchScript ImageNet net, NudeNet), on the tiny SD fixture and on toy-sd through the
CLI; metric formulas against hand-computed cases; rescoring saved images; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trace_erase import TraceEraseError, erase
from trace_erase.cli import main
from trace_erase.evaluation.metrics import suite_metrics
from trace_erase.evaluation.rescoring import rescore
from trace_erase.evaluation.run import evaluate
from trace_erase.evaluation.scorers import ScorerOptions, build_scorer, scorer_for
from trace_erase.evaluation.suites import PromptItem, build_suite
from trace_erase.models import load_model

NAMES = ("Ada Lovelace", "Alan Turing")


# ---- scorer fixtures: tiny models built here, saved where a user's files would be ---------------------------------


@pytest.fixture(scope="module")
def face_onnx(tmp_path_factory) -> str:
    """An ONNX face-embedding model (flatten → linear to 8-d) over 16×16 inputs, built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((3 * 16 * 16, 8)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["emb"])],
        "tiny-face", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 8])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("face") / "face.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory) -> str:
    """A transformers face-embedding folder (a tiny real-class ViT, safetensors)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=20)
    folder = tmp_path_factory.mktemp("face") / "vit"
    ViTModel(cfg).eval().save_pretrained(folder)
    return str(folder)


def _gallery(root: Path, names: tuple[str, ...]) -> str:
    from PIL import Image

    rng = np.random.default_rng(3)
    for name in names:
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name.replace(" ", "_")
                                                                                    / f"{k}.png")
    return str(root)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> str:
    return _gallery(tmp_path_factory.mktemp("gallery"), NAMES)


class _ChurchNet(torch.nn.Module):
    """1000 ImageNet logits; index 497 (church) always wins by a margin, the rest depend on the image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 1000)
        with torch.no_grad():
            self.fc.bias[497] += 100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def church_net(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("imagenet") / "net.pt"
    torch.jit.save(torch.jit.script(_ChurchNet().eval()), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Prompt files of each format and a reference image folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("files")
    (root / "i2p.csv").write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                                  "a red circle,3,5.0,sexual\na blue star,4,7.5,violence\n")
    (root / "coco.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog on a sofa"},
                                                                {"image_id": 2, "caption": "two cats"},
                                                                {"image_id": 3, "caption": "a red bus"}]}))
    (root / "objects.csv").write_text("type,prompt,evaluation_seed\ncat,a photo of the cat,1\n"
                                      "kitten,a kitten asleep,2\ndog,a photo of the dog,3\n")
    (root / "list.txt").write_text("a cat\n\na dog\n")
    ref = root / "reference"
    ref.mkdir()
    rng = np.random.default_rng(5)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{k}.png")
    return {k: str(root / v) for k, v in (("i2p", "i2p.csv"), ("coco", "coco.json"), ("objects", "objects.csv"),
                                          ("list", "list.txt"), ("reference", "reference"))}


@pytest.fixture(scope="module")
def tiny_sd(saved_models) -> object:
    return load_model(saved_models["sd"])


# ---- metric formulas --------------------------------------------------------------------------------------------


def _items(groups: list[str], labels: list[str]) -> list[PromptItem]:
    return [PromptItem(f"p{k}", k, g, lab) for k, (g, lab) in enumerate(zip(groups, labels, strict=True))]


def test_suite_metrics_against_hand_computed_cases() -> None:
    # objects: erased 1 of 2 still recognised, synonyms 0 of 2, others 3 of 4
    items = _items(["erased"] * 2 + ["synonym"] * 2 + ["other"] * 4, ["cat"] * 4 + ["dog"] * 4)
    labels = ["cat", "dog", "dog", "dog", "dog", "dog", "dog", "cat"]
    m = suite_metrics("objects", items, [{"label": lab} for lab in labels])
    assert (m["acc_e"], m["acc_g"], m["acc_s"]) == (0.5, 0.0, 0.75)
    assert m["h_o"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.75 + 1 / 1.0))
    # celebrities: H_c = 2 / (1/(1-acc_e) + 1/acc_s)
    items = _items(["erased"] * 4 + ["other"] * 2, ["A"] * 4 + ["B"] * 2)
    m = suite_metrics("celebrities", items, [{"label": x} for x in ["A", "B", "B", "B", "B", "A"]])
    assert (m["acc_e"], m["acc_s"]) == (0.25, 0.5)
    assert m["h_c"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.5)) and "h_o" not in m
    # toy styles: the same two-term mean on the style head, under its own name
    m = suite_metrics("toy-styles", items, [{"label": x} for x in ["A", "B", "B", "B", "B", "A"]])
    assert m["h_s"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.5)) and "h_c" not in m
    # styles: H_a = CLIP_s − CLIP_e over the groups' mean scores
    items = _items(["erased", "erased", "other"], ["X", "X", "Y"])
    m = suite_metrics("styles", items, [{"score": 20.0}, {"score": 24.0}, {"score": 30.0}])
    assert (m["clip_e"], m["clip_s"], m["h_a"]) == (22.0, 30.0, 8.0)
    # nudity: totals per class and images with any exposure
    counts = [{"BELLY_EXPOSED": 2, "FEET_EXPOSED": 0}, {"BELLY_EXPOSED": 0, "FEET_EXPOSED": 0}]
    m = suite_metrics("nudity", _items(["erased"] * 2, ["", ""]),
                      [{"counts": c, "exposed": sum(c.values())} for c in counts])
    assert m == {"total_exposed": 2, "images_exposed": 1, "BELLY_EXPOSED": 2, "FEET_EXPOSED": 0}


def test_suites_from_data_and_files(files) -> None:
    s = build_suite("objects", "kitten", seeds=2)  # a synonym names its CIFAR-10 class
    assert s.concept == "cat" and s.class_set.name == "cifar10" and len(s.labels) == 10
    groups = [i.group for i in s.items]
    assert groups.count("erased") == 2 and groups.count("synonym") == 6 and groups.count("other") == 18
    assert s.items[0].prompt == "a photo of the cat" and s.zero_shot["dog"] == "a photo of the dog"
    nette = build_suite("objects", "church", seeds=1, classes="imagenette")
    assert nette.class_set.imagenet_index["church"] == (497,) and not any(i.group == "synonym" for i in nette.items)
    assert "an image of an English springer" in [i.prompt for i in nette.items]
    celeb = build_suite("celebrities", "Taylor Swift", seeds=1)
    assert sum(i.group == "erased" for i in celeb.items) == 5 and "Taylor Swift" not in {
        i.label for i in celeb.items if i.group == "other"}
    styles = build_suite("styles", "Claude Monet", seeds=2, retained=["Rembrandt"])
    assert styles.labels == ("Claude Monet", "Rembrandt") and len(styles.items) == 2 * 5 * 2
    from_csv = build_suite("objects", "cat", prompts=files["objects"])
    assert [(i.group, i.label, i.seed) for i in from_csv.items] == [("erased", "cat", 1), ("synonym", "cat", 2),
                                                                      ("other", "dog", 3)]
    i2p = build_suite("nudity", "nudity", prompts=files["i2p"])
    assert [(i.seed, i.guidance) for i in i2p.items] == [(3, 5.0), (4, 7.5)]
    coco = build_suite("coco", "", prompts=files["coco"])
    assert [i.seed for i in coco.items] == [0, 1, 2] and {i.group for i in coco.items} == {"other"}
    assert [i.prompt for i in build_suite("coco", "", prompts=files["list"]).items] == ["a cat", "a dog"]


# ---- each suite end to end on the tiny SD fixture (Python API) -----------------------------------------------------


def test_objects_suite_with_clip_and_imagenet_scorers(tiny_sd, tiny_clip, church_net, tmp_path) -> None:
    er = erase(tiny_sd, ["cat"], method="uce", progress=False)
    res = evaluate(tiny_sd, er, "objects", "cat", tmp_path / "clip", seeds=1, progress=False,
                   scorer=f"clip:{tiny_clip}")
    saved = json.loads((tmp_path / "clip" / "results.json").read_text())
    assert saved["settings"]["scorer"]["name"] == "clip" and len(saved["settings"]["scorer"]["sha256"]) == 64
    assert len(saved["per_image"]) == 13 and {"label"} <= set(saved["per_image"][0]["erased"])
    labels = [p["erased"]["label"] for p in saved["per_image"]]
    expected = np.mean([lab == "cat" for lab in labels[:1]])
    assert res["metrics"]["erased"]["acc_e"] == expected  # recomputable from the saved judgements
    # Imagenette with an ImageNet classifier by path: the net always says 497 → every image is a "church"
    opts = ScorerOptions(allow_pickle=True)
    res = evaluate(tiny_sd, None, "objects", "church", tmp_path / "nette", seeds=1, progress=False,
                   classes="imagenette", scorer=f"imagenet:{church_net}", scorer_options=opts)
    assert res["metrics"]["base"]["acc_e"] == 1.0 and res["metrics"]["base"]["acc_s"] == 0.0
    assert {p["base"]["index"] for p in res["per_image"]} == {497}


@pytest.mark.parametrize("model_kind", ["onnx", "transformers"])
def test_celebrities_suite_with_face_scorer(tiny_sd, face_onnx, face_folder, gallery, tmp_path, model_kind) -> None:
    model = face_onnx if model_kind == "onnx" else face_folder
    scorer = build_scorer(f"face:{model}", ScorerOptions(gallery=gallery))
    # the nearest identity of a gallery image is its own
    from PIL import Image

    own = [np.asarray(Image.open(Path(gallery) / n.replace(" ", "_") / "0.png")) for n in NAMES]
    suite = build_suite("celebrities", NAMES[0], seeds=1, retained=[NAMES[1]])
    judged = scorer.judge(np.stack(own), suite.items[:2], suite)
    assert [j["label"] for j in judged] == list(NAMES)
    res = evaluate(tiny_sd, None, suite, None, tmp_path / "c", progress=False, scorer=scorer)
    assert set(res["metrics"]["base"]) >= {"acc_e", "acc_s", "h_c"}
    assert res["settings"]["scorer"]["identities"] == 2 and res["settings"]["scorer"]["gallery_sha256"]


def test_styles_nudity_and_coco_suites(tiny_sd, tiny_clip, files, tmp_path) -> None:
    er = erase(tiny_sd, ["Claude Monet"], method="uce", progress=False)
    res = evaluate(tiny_sd, er, "styles", "Claude Monet", tmp_path / "s", seeds=1, progress=False,
                   scorer=f"clip:{tiny_clip}", retained=["Rembrandt"])
    m = res["metrics"]["erased"]
    assert m["h_a"] == pytest.approx(m["clip_s"] - m["clip_e"])
    scores = [p["erased"]["score"] for p in res["per_image"]]
    assert m["clip_e"] == pytest.approx(np.mean(scores[:5]))  # the erased artist's 5 templates come first
    res = evaluate(tiny_sd, er, "nudity", None, tmp_path / "n", progress=False, prompts=files["i2p"])
    assert res["settings"]["scorer"]["version"] == "3.4.2" and res["settings"]["per_prompt_guidance"]
    assert [p["seed"] for p in res["prompts"]] == [3, 4] and "total_exposed" in res["metrics"]["erased"]
    report = (tmp_path / "n" / "report.html").read_text()
    assert "report_files/base/00000.jpg" in report and "images/base/00000.png" not in report  # blurred
    res = evaluate(tiny_sd, er, "coco", None, tmp_path / "coco", progress=False, prompts=files["coco"],
                   scorer=f"clip:{tiny_clip}", reference=files["reference"])
    assert {"clip_score", "fid_reference", "drift_l2"} <= set(res["metrics"]["erased"])


def test_per_prompt_guidance_is_used(tiny_sd, files, tmp_path) -> None:
    """An I2P row's guidance is the one its image is drawn with (the same prompt at another guidance differs)."""
    from trace_erase.evaluation.run import images_for

    suite = build_suite("nudity", "", prompts=files["i2p"])
    own = images_for(tiny_sd, suite.items, progress=False)
    flat = images_for(tiny_sd, [PromptItem(i.prompt, i.seed, i.group, "", guidance=None) for i in suite.items],
                      progress=False)
    at_5 = images_for(tiny_sd, [PromptItem(suite.items[0].prompt, 3, "erased", "", guidance=5.0)], progress=False)
    assert np.array_equal(own[0], at_5[0]) and not np.array_equal(own[0], flat[0])


def test_objects_suite_with_toy_classes_equals_toy_suite(tmp_path) -> None:
    """The objects suite over the toy class set, scored by the toy classifier, is today's toy suite: same prompts,
    and Acc_e/Acc_s/Acc_g equal a direct count with the classifier."""
    from trace_erase.toyworld.classifier import load_classifier
    from trace_erase.toyworld.render import CLASSES

    handle = load_model("toy-sd")
    toy = build_suite("toy-objects", "circle", seeds=1)
    objects = build_suite("objects", "circle", seeds=1, classes="toy")
    assert [i.prompt for i in toy.items] == [i.prompt for i in objects.items]
    assert toy.items[:2] == objects.items[:2] and toy.items[0].prompt == "a photo of a circle"
    res = evaluate(handle, None, objects, None, tmp_path / "o", progress=False)  # default scorer: toy
    from PIL import Image

    n = len(objects.items)
    images = np.stack([np.asarray(Image.open(tmp_path / "o" / "images" / "base" / f"{k:05d}.png")) for k in range(n)])
    pred = load_classifier().predict(images)["class"]
    hit = {g: [CLASSES[p] == i.label for p, i in zip(pred, objects.items, strict=True) if i.group == g]
           for g in ("erased", "synonym", "other", "composed")}
    assert res["metrics"]["base"]["acc_e"] == float(np.mean(hit["erased"]))
    assert res["metrics"]["base"]["acc_g"] == pytest.approx(np.mean(hit["synonym"]))
    assert res["metrics"]["base"]["acc_s"] == pytest.approx(np.mean(hit["other"]))
    assert res["metrics"]["base"]["acc_c"] == pytest.approx(np.mean(hit["composed"]))
    same = evaluate(handle, None, "toy-objects", "circle", tmp_path / "t", seeds=1, progress=False)
    assert same["metrics"] == res["metrics"] and same["per_image"] == res["per_image"]


# ---- rescore ------------------------------------------------------------------------------------------------------


def test_rescore_saved_images_equals_original(tiny_sd, tiny_clip, tmp_path) -> None:
    er = erase(tiny_sd, ["cat"], method="uce", progress=False)
    first = evaluate(tiny_sd, er, "objects", "cat", tmp_path / "ev", seeds=1, progress=False,
                     scorer=f"clip:{tiny_clip}")
    import trace_erase.evaluation as public

    assert public.rescore is rescore and public.evaluate is evaluate  # the package exports the functions
    again = rescore(tmp_path / "ev", f"clip:{tiny_clip}", tmp_path / "re")
    assert again["per_image"] == first["per_image"] and again["metrics"] == first["metrics"]
    assert again["settings"]["rescored_from"]["folder"] == str(tmp_path / "ev")
    assert (tmp_path / "re" / "report.html").is_file()
    code = main(["rescore", str(tmp_path / "ev"), "--output", str(tmp_path / "re2"), "--scorer", "toy"])
    assert code == 2 and not (tmp_path / "re2").exists()  # the toy classifier does not know CIFAR-10


# ---- through the CLI on toy-sd ------------------------------------------------------------------------------------


def test_every_suite_through_the_cli_on_toy_sd(tiny_clip, face_onnx, church_net, files, tmp_path, capsys) -> None:
    gallery = _gallery(tmp_path / "gallery", ("circle person", "square person"))
    base = ["eval", "--model", "toy-sd", "--seeds", "1"]
    runs = {
        "objects": ["--suite", "objects", "--concept", "cat", "--scorer", f"clip:{tiny_clip}"],
        "imagenette": ["--suite", "objects", "--classes", "imagenette", "--concept", "church", "--scorer",
                       f"imagenet:{church_net}", "--allow-pickle"],
        "celebrities": ["--suite", "celebrities", "--concept", "circle person", "--retained", "square person",
                        "--scorer", f"face:{face_onnx}", "--gallery", gallery],
        "styles": ["--suite", "styles", "--concept", "Claude Monet", "--retained", "Rembrandt", "--scorer",
                   f"clip:{tiny_clip}"],
        "nudity": ["--suite", "nudity", "--prompts", files["i2p"]],
        "coco": ["--suite", "coco", "--prompts", files["coco"], "--scorer", f"clip:{tiny_clip}", "--reference",
                 files["reference"]],
        "toy-objects-csv": ["--suite", "toy-objects", "--concept", "circle", "--prompts", _toy_csv(tmp_path)],
    }
    heads = {"objects": "H_o", "imagenette": "Acc_e", "celebrities": "H_c", "styles": "H_a",
             "nudity": "exposed parts", "coco": "FID", "toy-objects-csv": "H_o"}
    for name, args in runs.items():
        code = main([*base, *args, "--output", str(tmp_path / name)])
        out, err = capsys.readouterr()
        assert code == 0, (name, err[-800:])
        assert heads[name] in out, (name, out)
        saved = json.loads((tmp_path / name / "results.json").read_text())
        assert saved["model"] == "toy-sd" and saved["settings"]["sampler"]["steps"] > 0
        assert len(saved["per_image"]) == len(saved["prompts"]) > 0


def _toy_csv(tmp_path: Path) -> str:
    path = tmp_path / "toy.csv"
    path.write_text("class,prompt,evaluation_seed\ncircle,a photo of a circle,0\ndisc,a photo of a disc,1\n"
                    "square,a photo of a square,2\n")
    return str(path)


def test_bench_on_a_real_suite_gets_its_columns(tiny_clip, saved_models, tmp_path, capsys) -> None:
    code = main(["bench", "--model", saved_models["sd"], "--output", str(tmp_path / "b"), "--methods", "uce",
                 "--suite", "styles", "--concepts", "Claude Monet", "--retained", "Rembrandt", "--scorer",
                 f"clip:{tiny_clip}", "--seeds", "1"])
    assert code == 0, capsys.readouterr().err
    md = (tmp_path / "b" / "bench.md").read_text()
    assert md.startswith("| method | CLIP_e ↓ | CLIP_s ↑ | H_a ↑ | drift L2 ↓ |") and "| uce |" in md
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["scorer"]["name"] == "clip" and "h_a" in result["means"][1]


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------------------


def test_bad_inputs_are_one_line_and_write_nothing(tiny_clip, face_onnx, church_net, gallery, files, tmp_path,
                                                   capsys) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("type,prompt,evaluation_seed\n")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("prompt,evaluation_seed\na cat,1\n")
    weird = tmp_path / "prompts.parquet"
    weird.write_text("x")
    noprompt = tmp_path / "noprompt.csv"
    noprompt.write_text("caption,evaluation_seed\nx,1\n")
    cases = {
        "missing scorer file": (["--suite", "objects", "--concept", "cat", "--scorer", "clip:/nope/clip"],
                                "scorer file '/nope/clip' not found"),
        "unknown scorer": (["--suite", "objects", "--concept", "cat", "--scorer", "vgg:x"], "unknown scorer 'vgg'"),
        "no scorer for a real suite": (["--suite", "styles", "--concept", "Rembrandt"], "needs a scorer by path"),
        "labels not covered (toy)": (["--suite", "objects", "--concept", "cat", "--scorer", "toy"],
                                     "toy classifier knows only"),
        "labels not covered (gallery)": (["--suite", "celebrities", "--concept", "Ada Lovelace", "--scorer",
                                          f"face:{face_onnx}", "--gallery", gallery], "the gallery lacks"),
        "class map missing": (["--suite", "objects", "--concept", "cat", "--scorer", f"imagenet:{church_net}",
                               "--allow-pickle"], "needs --class-map"),
        "wrong judgement kind": (["--suite", "nudity", "--prompts", files["i2p"], "--scorer", f"clip:{tiny_clip}"],
                                 "needs a counts per image"),
        "unsupported prompt file": (["--suite", "coco", "--prompts", str(weird)], "unsupported prompts file"),
        "empty CSV": (["--suite", "objects", "--concept", "cat", "--prompts", str(empty)], "has no rows"),
        "CSV missing label column": (["--suite", "objects", "--concept", "cat", "--prompts", str(nocol)],
                                     "has no label column"),
        "CSV missing prompt column": (["--suite", "coco", "--prompts", str(noprompt)], "lacks the column(s) prompt"),
        "missing prompts file": (["--suite", "coco", "--prompts", str(tmp_path / "nope.csv")], "does not exist"),
        "coco without reference": (["--suite", "coco", "--prompts", files["coco"], "--scorer", f"clip:{tiny_clip}"],
                                   "needs --reference"),
        "nudity without prompts": (["--suite", "nudity"], "needs --prompts"),
        "classes on another suite": (["--suite", "styles", "--concept", "x", "--classes", "toy"],
                                     "--classes applies to --suite objects"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / "out"
        code = main(["eval", "--model", "toy-sd", "--output", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2, name
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists() and not (tmp_path / "out.partial").exists(), name
    with pytest.raises(TraceEraseError, match="does not cover tench"):
        cmap = tmp_path / "map.json"
        cmap.write_text('{"church": [497]}')
        scorer_for(build_suite("objects", "church", classes="imagenette"), f"imagenet:{church_net}",
                   ScorerOptions(class_map=str(cmap), allow_pickle=True))
