"""``attribute_contexts``: the concept inside generic colour / texture / setting phrases, in stage A's augmentation
and stage B's training prompts."""

from __future__ import annotations

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.api import method_configs
from trace_erase.config import Concept
from trace_erase.engines.prompts import ATTRIBUTE_TEMPLATES, ATTRIBUTE_TRAIN_TEMPLATES
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.evaluation.suites import COMPOSITIONS
from trace_erase.methods import get_method

from .conftest import BUILDERS
from .test_closed_form import _pred
from .test_trajectory import FAST


def test_one_option_reaches_both_stages_and_other_shared_names_stay_with_stage_a() -> None:
    cf, tr = method_configs(get_method("trace"), {"attribute_contexts": True, "batch_size": 7}, "sd")
    assert cf.attribute_contexts and tr.attribute_contexts
    assert (cf.batch_size, tr.batch_size) == (7, 2)  # batch_size keeps meaning stage A's encoding batch for trace
    _, tr = method_configs(get_method("esd-x"), {"attribute_contexts": True}, "sd")
    assert tr.attribute_contexts
    cf, tr = method_configs(get_method("trace"), {}, "sd")
    assert not cf.attribute_contexts and not tr.attribute_contexts


def test_attribute_templates_do_not_use_the_toy_suites_composition_phrasings() -> None:
    """The list is generic: none of the evaluation's composition frames, none of the toy world's style words."""
    from trace_erase.toyworld.render import STYLES

    frames = {w for c in COMPOSITIONS for w in c.split() if "{" not in w} - {"a", "on", "in", "the"}
    assert frames == {"background", "simple", "middle"}
    for template in (*ATTRIBUTE_TEMPLATES, *ATTRIBUTE_TRAIN_TEMPLATES):
        words = set(template.replace("{}", " ").split())
        assert not words & frames, template
        assert not words & set(STYLES), template


def test_stage_a_with_attribute_contexts_erases_the_concept_inside_attribute_phrases() -> None:
    """Trained on "a photo of a {}" alone, stage A leaves much of "a red cat"'s prediction; with the attribute
    contexts in its augmentation that prediction comes close to "a red dog"'s (the anchor in the same phrase)."""
    held = ["a red cat", "a cat on a table", "a golden cat in the snow"]
    anchors = [p.replace("cat", "dog") for p in held]
    gaps = {}
    for on in (False, True):
        pipe = BUILDERS["sd"]()
        adapter = get_adapter(pipe)
        before = _pred(adapter, anchors)
        start = _pred(adapter, held)
        erase(pipe, ["cat"], anchor="dog", method="trace-closed-form", progress=False, rece_rounds=0,
              templates=["a photo of a {}"], preserve_corpus=None, lambda_reg=1e-4, attribute_contexts=on
              ).apply(pipe)
        after = _pred(adapter, held)
        gaps[on] = float((after - before).norm() / (start - before).norm())
    assert gaps[True] < 0.5 * gaps[False], gaps


def test_stage_b_rolls_out_and_encodes_the_attribute_prompts_only_when_on() -> None:
    for on in (False, True):
        adapter = get_adapter(BUILDERS["sd"]())
        cfg = TrajectoryConfig.from_options(**{**FAST, "pool_trajectories": 8, "attribute_contexts": on})
        eng = TrajectoryEngine(adapter, cfg, progress=False)
        seen: list[str] = []
        encode = eng.cond

        def recording(prompts: list[str], seen: list[str] = seen, encode=encode):
            seen.extend(prompts)
            return encode(prompts)

        eng.cond = recording  # type: ignore[method-assign]
        torch.manual_seed(0)
        eng.train([Concept("cat")])
        attribute_prompts = {t.format("cat") for t in ATTRIBUTE_TRAIN_TEMPLATES}
        assert bool(attribute_prompts & set(seen)) == on
        assert "a photo of cat" in seen


@pytest.mark.parametrize("option", [{"attribute_contexts": "maybe"}])
def test_attribute_contexts_takes_a_boolean(option) -> None:
    from trace_erase.errors import TraceEraseError

    with pytest.raises(TraceEraseError, match="attribute_contexts"):
        method_configs(get_method("trace"), option, "sd")
