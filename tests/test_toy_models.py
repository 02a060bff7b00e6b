"""The bundled toy pipelines: they load offline, draw what they are asked for, and TRACE erases a class."""

from __future__ import annotations

import pytest

from trace_erase import erase, load_model
from trace_erase.evaluation.metrics import suite_metrics
from trace_erase.evaluation.run import images_for
from trace_erase.evaluation.scorers.toy import ToyScorer
from trace_erase.evaluation.suites import PromptItem
from trace_erase.toyworld.classifier import load_classifier
from trace_erase.toyworld.render import CLASSES


def _items(cls: str, seeds: int, group: str) -> list[PromptItem]:
    return [PromptItem(f"a photo of a {cls}", s, group, cls, "class") for s in range(seeds)]


@pytest.mark.parametrize(("name", "cls"), [("toy-sd", "circle"), ("toy-flux", "diamond")])
def test_bundled_pipeline_loads_and_draws_the_class(name, cls) -> None:
    handle = load_model(name)
    assert handle.defaults["resolution"] == 32
    items = _items(cls, 8, "other")  # one of its strong classes; the per-class tables are in the README
    images = images_for(handle, items, progress=False)
    assert images.shape == (8, 32, 32, 3)
    pred = load_classifier().predict(images)["class"]
    assert (pred == CLASSES.index(cls)).mean() >= 0.8


def test_bundled_vae_reconstructions_keep_every_style() -> None:
    """The shared toy VAE is the ceiling for every sample; fine patterns (4-pixel stripes and dots) must survive it."""
    from trace_erase.toyworld.check import vae_reconstruction

    rec = vae_reconstruction(load_model("toy-sd").pipe.vae, n=200)
    assert rec["class"] >= 0.98 and rec["color"] >= 0.95, rec
    assert min(rec["style_by_style"].values()) >= 0.95, rec["style_by_style"]


def test_trace_erases_a_class_on_toy_sd() -> None:
    """Erase "circle" with the defaults: the built-in preserve corpus (everyday captions, no toy class names) must
    keep "square", which nothing names. (Without it stage A also moves the prompts' shared rows and squares fall to
    ~0.6.)"""
    handle = load_model("toy-sd")
    er = erase(handle, ["circle"], method="trace", progress=False, steps=150)
    er.apply(handle)
    items = _items("circle", 10, "erased") + _items("square", 10, "other")
    judged = ToyScorer().judge(images_for(handle, items, progress=False), items, None)
    acc = suite_metrics("toy-objects", items, judged)
    assert acc["acc_e"] <= 0.2, acc
    assert acc["acc_s"] >= 0.7, acc
