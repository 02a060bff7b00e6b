"""Automatic neighbour preservation in stage A: the words the first solve moves most are kept by the second."""

from __future__ import annotations

import pytest

from trace_erase import erase, get_adapter
from trace_erase.api import with_neighbours
from trace_erase.config import Concept, make_concepts
from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine
from trace_erase.engines.neighbours import measure, nearest_by_embedding, select_neighbours, vocabulary_words
from trace_erase.errors import TraceEraseError

from .conftest import BUILDERS

BASE = {"templates": ["a photo of a {}", "{}"], "lambda_reg": 0.01, "preserve_corpus": None, "probe_prompts": []}


def _engine(**options) -> ClosedFormEngine:
    return ClosedFormEngine(get_adapter(BUILDERS["sd"]()), ClosedFormConfig(**{**BASE, **options}), progress=False)


def _shares(engine: ClosedFormEngine, concepts: list[Concept], words: list[str]) -> list[float]:
    """moved(w) of ``words`` under the engine's solve of ``concepts`` as its statistics stand."""
    stats = engine.statistics(concepts)
    solutions = {s.name: engine.solve(s, stats[s.name])[0] for s in engine.streams}
    return [float(x) for x in measure(engine, words, solutions, 0)[0]]


def test_the_chosen_neighbours_are_the_most_moved_and_the_second_solve_keeps_them() -> None:
    concepts = make_concepts(["cat"], anchor="thing")
    engine = _engine(neighbours=3, neighbour_synonym=100.0, neighbour_similarity=1.0)
    chosen, own = select_neighbours(engine, concepts, engine.statistics(concepts))
    assert len(chosen) == 3 and "cat" in own and "thing" not in chosen and "cat" not in chosen
    candidates = [w for w in vocabulary_words(engine.adapter, "model") if w not in {"cat", "thing"}]
    shares = dict(zip(candidates, _shares(engine, concepts, candidates), strict=True))
    top = sorted(shares, key=shares.get, reverse=True)[:3]
    assert set(chosen) == set(top)  # the most moved, not the least (a flipped ranking would fail here)
    before = _shares(engine, concepts, list(chosen))
    engine.extra_preserve = list(chosen)
    after = _shares(engine, concepts, list(chosen))
    assert max(a / b for a, b in zip(after, before, strict=True)) < 0.5, (before, after)


def test_words_moved_like_the_concept_are_left_to_the_erasure() -> None:
    """The synonym rule: a candidate the edit moves as much as the concept is not preserved; with the bar at 0 every
    candidate counts as a synonym and nothing is preserved."""
    concepts = make_concepts(["cat"], anchor="thing")
    engine = _engine(neighbours=5, neighbour_similarity=1.0)
    stats = engine.statistics(concepts)
    assert select_neighbours(_engine(neighbours=5, neighbour_synonym=1e-9), concepts, stats)[0] == {}
    chosen, own = select_neighbours(engine, concepts, stats)
    assert chosen and max(chosen.values()) < 0.5 * own["cat"]


def test_erase_records_the_neighbours_and_stage_b_gets_them_as_preserve_prompts(tmp_path) -> None:
    pipe = BUILDERS["sd"]()
    options = {k: v for k, v in BASE.items() if k != "probe_prompts"}
    er = erase(pipe, ["cat"], anchor="thing", method="trace-closed-form", progress=False, neighbours=2,
               neighbour_similarity=1.0, neighbour_synonym=100.0, **options)
    record = er.manifest["neighbours"]
    assert len(record["preserved"]) == 2 and set(record["concepts"]) == {"cat"}
    plain = erase(pipe, ["cat"], anchor="thing", method="trace-closed-form", progress=False, **options)
    assert "neighbours" not in plain.manifest
    assert er.manifest["rows"] != plain.manifest["rows"]  # the second solve preserved more rows

    class Found:
        neighbours = record

    (c,) = with_neighbours([Concept("cat", "thing", ["dog"])], Found())
    assert c.preserve == ["dog", *record["preserved"]]
    assert with_neighbours([Concept("cat")], None)[0].preserve == []


def test_a_word_file_is_read_and_bad_settings_are_refused_in_one_line(tmp_path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("dog car\nhouse, tree\n")
    concepts = make_concepts(["cat"], anchor="thing")
    engine = _engine(neighbours=2, neighbour_vocab=str(words), neighbour_synonym=100.0, neighbour_similarity=1.0)
    chosen, _ = select_neighbours(engine, concepts, engine.statistics(concepts))
    assert set(chosen) <= {"dog", "car", "house", "tree"} and len(chosen) == 2
    for bad, match in (({"neighbours": -1}, "neighbours must be"), ({"neighbour_synonym": 0}, "neighbour_synonym"),
                       ({"neighbours": 2, "neighbour_vocab": str(tmp_path / "none.txt")}, "does not exist"),
                       ({"neighbour_pool": 16}, "neighbour_pool has no effect with neighbours=0")):
        with pytest.raises(TraceEraseError, match=match) as err:
            ClosedFormConfig(**bad)
        assert "\n" not in str(err.value)


def test_the_similarity_rule_alone_leaves_words_alike_the_concept_to_the_erasure() -> None:
    """With the synonym rule out of reach, a similarity bar below every candidate's leaves nothing to preserve; the
    bar at 1 leaves every word a candidate."""
    concepts = make_concepts(["cat"], anchor="thing")
    engine = _engine(neighbours=3, neighbour_synonym=100.0)
    stats = engine.statistics(concepts)
    assert len(select_neighbours(_engine(neighbours=3, neighbour_synonym=100.0, neighbour_similarity=1.0),
                                 concepts, stats)[0]) == 3
    assert select_neighbours(_engine(neighbours=3, neighbour_synonym=100.0, neighbour_similarity=-0.999),
                             concepts, stats)[0] == {}


def test_the_embedding_prefilter_keeps_the_words_nearest_the_concepts_tokens() -> None:
    """A pool smaller than the vocabulary keeps the ``pool`` words whose embedding rows are nearest (cosine) the
    concept's, in vocabulary order; the farthest words are the ones dropped."""
    import torch

    adapter = get_adapter(BUILDERS["sd"]())
    concepts = make_concepts(["cat"], anchor="thing")
    words = [w for w in vocabulary_words(adapter, "model") if w not in {"cat", "thing"}]
    kept = nearest_by_embedding(adapter, words, concepts, 5)
    tok, table = adapter.pipe.tokenizer, adapter.pipe.text_encoder.get_input_embeddings().weight.detach()
    cat = torch.nn.functional.normalize(table[tok("cat", add_special_tokens=False)["input_ids"]], dim=-1)

    def near(w: str) -> float:
        row = torch.nn.functional.normalize(table[tok(w, add_special_tokens=False)["input_ids"][0]], dim=-1)
        return float((cat @ row).max())

    assert len(kept) == 5 and kept == [w for w in words if w in kept]
    assert min(near(w) for w in kept) >= max(near(w) for w in words if w not in kept)
    assert nearest_by_embedding(adapter, words[:3], concepts, 5) == words[:3]


def test_erase_hands_the_found_words_to_stage_b(monkeypatch) -> None:
    """trace's stage B receives each concept with stage A's found words added to its preserve prompts."""
    import trace_erase.api as api

    seen: list[list[Concept]] = []
    monkeypatch.setattr(api, "_stage_b", lambda run, adapter, engine, cfg, concepts, *rest: seen.append(concepts))
    options = {k: v for k, v in BASE.items() if k != "probe_prompts"}
    er = erase(BUILDERS["sd"](), ["cat"], anchor="thing", method="trace", progress=False, neighbours=2,
               neighbour_similarity=1.0, neighbour_synonym=100.0, steps=1, preserve=["dog"], **options)
    (c,) = seen[0]
    assert c.preserve == ["dog", *er.manifest["neighbours"]["preserved"]] and len(c.preserve) == 3


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_neighbours_run_on_every_family(family: str) -> None:
    """The word positions come from each family's token layout (SD3's joint CLIP + T5 sequence included)."""
    options = {k: v for k, v in BASE.items() if k != "probe_prompts"}
    er = erase(BUILDERS[family](), ["cat"], anchor="thing", method="trace-closed-form", progress=False,
               neighbours=2, neighbour_similarity=1.0, neighbour_synonym=100.0, **options)
    assert len(er.manifest["neighbours"]["preserved"]) == 2


def test_export_statistics_rebuild_the_preserve_set_the_second_solve_had() -> None:
    """An export's Gram-weighted truncation and certificate read the solve's statistics: with neighbours on, the
    found words' rows are in the preserve Gram, as in the solve (they were missing before the manifest was read)."""
    import types

    import torch

    from trace_erase.engines.export_stats import ExportStatistics

    pipe = BUILDERS["sd"]()
    options = {k: v for k, v in BASE.items() if k != "probe_prompts"}
    found = {"neighbours": 2, "neighbour_similarity": 1.0, "neighbour_synonym": 100.0}
    er = erase(pipe, ["cat"], anchor="thing", method="trace-closed-form", progress=False, **found, **options)
    adapter = get_adapter(pipe)
    engine = ClosedFormEngine(adapter, ClosedFormConfig(**{**options, **found}), progress=False)
    solved = engine.gather(make_concepts(["cat"], anchor="thing"))
    _, rebuilt = ExportStatistics(er, types.SimpleNamespace(adapter=adapter))._ready()
    for name, st in solved.items():
        assert rebuilt[name].counts["preserve"] == st.counts["preserve"] > 0
        assert torch.allclose(rebuilt[name].g_p, st.g_p)
