"""Stage A: the closed form, its certificate, LoRA export and the effect on predictions."""

from __future__ import annotations

import copy

import pytest
import torch

from trace_erase import erase, get_adapter
from trace_erase.artifacts.lora import delta_to_lora, deltas_to_state_dict, lora_to_delta
from trace_erase.config import Concept
from trace_erase.engines.closed_form import ClosedFormConfig, ClosedFormEngine, aligned_positions
from trace_erase.errors import TraceEraseError
from trace_erase.models.base import TokenLayout
from trace_erase.models.builders import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import BUILDERS


def _rows(engine: ClosedFormEngine, concepts: list[Concept], stream: str):
    e, a, p = [], [], []
    for b in engine.iter_rows(concepts):
        if b.stream != stream:
            continue
        if b.kind == "erase":
            e.append(b.e)
            a.append(b.a)
        elif b.kind == "preserve":
            p.append(b.e)
    return torch.cat(e).double(), torch.cat(a).double(), (torch.cat(p).double() if p else None)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_closed_form_equals_lstsq_of_stacked_system(name: str) -> None:
    pipe = BUILDERS[name]()
    adapter = get_adapter(pipe)
    cfg = ClosedFormConfig(templates=["a photo of {}", "{} in a landscape", "a painting of {}"], lambda_reg=0.3,
                           lambda_preserve=2.0)
    engine = ClosedFormEngine(adapter, cfg, progress=False)
    concepts = [Concept("cat", "dog", ["car"]), Concept("van gogh", "", [])]
    result = engine.run(concepts)
    for stream in engine.streams:
        e, a, p = _rows(engine, concepts, stream.name)
        module = stream.modules[-1]
        w = adapter.module(module).weight.detach().double()
        d = w.shape[1]
        # stack: rows e → W a ; √λ_p p → √λ_p W p ; √λ I → √λ W   (solve X Wᵀ = Y)
        x = torch.cat([e, cfg.lambda_preserve**0.5 * p, cfg.lambda_reg**0.5 * torch.eye(d, dtype=torch.float64)])
        y = torch.cat([a @ w.T, cfg.lambda_preserve**0.5 * p @ w.T, cfg.lambda_reg**0.5 * w.T])
        w_lstsq = torch.linalg.lstsq(x, y).solution.T
        w_closed = w + result.deltas[module]
        rel = (w_closed - w_lstsq).norm() / w_lstsq.norm()
        assert rel < 1e-5, (stream.name, float(rel))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_small_lambda_maps_target_to_anchor_and_keeps_preserved(name: str) -> None:
    adapter = get_adapter(BUILDERS[name]())
    cfg = ClosedFormConfig(token_selection="target", templates=["{}", "a photo of {}"], lambda_reg=1e-7,
                           lambda_preserve=1.0, probe_prompts=[])
    result = ClosedFormEngine(adapter, cfg, progress=False).run([Concept("cat", "dog", ["car", "house"])])
    for module, cert in result.certificate.items():
        assert cert["erasure_residual_before"] > 0.01, module  # there was something to erase
        assert cert["erasure_residual"] <= 1e-3, (module, cert)
        assert cert["collateral_preserve"] <= 1e-3, (module, cert)


def test_many_concepts_share_one_solve() -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    cfg = ClosedFormConfig(token_selection="target", templates=["{}"], lambda_reg=1e-7, probe_prompts=[])
    concepts = [Concept(c, "thing") for c in ("cat", "dog", "horse", "bird", "tree")]
    result = ClosedFormEngine(adapter, cfg, progress=False).run(concepts)
    assert result.counts["tokens"]["erase"] == 5
    assert max(c["erasure_residual"] for c in result.certificate.values()) < 1e-3


def test_lora_export_is_exact_low_rank() -> None:
    adapter = get_adapter(BUILDERS["sd"]())
    cfg = ClosedFormConfig(token_selection="target", templates=["{}", "a photo of {}"], probe_prompts=[])
    result = ClosedFormEngine(adapter, cfg, progress=False).run([Concept("cat", "dog")])
    for delta in result.deltas.values():
        a, b = delta_to_lora(delta)
        assert a.shape[0] <= 2 * 2  # at most one rank per distinct erased row (2 prompts × ≤2 tokens)
        assert ((b @ a - delta).norm() / delta.norm()) < 1e-5
    state, ranks = deltas_to_state_dict(result.deltas, "unet")
    back = lora_to_delta(state, "unet")  # through float32 storage and zero-padding to one rank
    for name, delta in result.deltas.items():
        assert ((back[name] - delta).norm() / delta.norm()) < 1e-5
    assert len({v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}) == 1


def test_aligned_positions() -> None:
    # target "a photo of big cat" (BOS a photo of big cat EOS) vs anchor "a photo of dog"
    lt = TokenLayout(start=4, end=6, length=7, max_length=10)
    la = TokenLayout(start=4, end=5, length=6, max_length=10)
    t, a = aligned_positions(lt, la, "target")
    assert (t, a) == ([4, 5], [4, 4])
    t, a = aligned_positions(lt, la, "surrounding")
    assert t == [4, 5, 6, 7, 8, 9] and a == [4, 4, 5, 6, 7, 8]
    t, a = aligned_positions(lt, la, "context", suffix_tokens=2)
    assert (t, a) == ([6, 7], [5, 6])
    t, a = aligned_positions(lt, la, "last")
    assert t[0] == 5 and a[0] == 4
    t, a = aligned_positions(lt, la, "all")
    assert t[:4] == [0, 1, 2, 3] and a[:4] == [0, 1, 2, 3]
    empty = TokenLayout(start=4, end=4, length=5, max_length=10)  # empty anchor: concept maps to where it would be
    t, a = aligned_positions(lt, empty, "target")
    assert a == [4, 4]
    # a bidirectional encoder (T5): the positions before the concept are mapped too, onto the anchor's
    t, a = aligned_positions(lt, la, "surrounding", bidirectional=True)
    assert t == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and a == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert aligned_positions(lt, la, "target", bidirectional=True) == aligned_positions(lt, la, "target")


def test_bidirectional_stream_maps_every_position_of_a_flux_prompt() -> None:
    """FLUX's T5 stream: after a small-λ solve (surrounding tokens, no preserve), the edited context embedder sends
    every position of "a photo of cat" — the prefix included — to the anchor prompt's features at the aligned
    position. (Before: the prefix kept the concept.)"""
    adapter = get_adapter(tiny_flux_pipeline(max_length=8))
    assert next(s for s in adapter.text_streams() if s.name == "tokens").bidirectional
    cfg = ClosedFormConfig(token_selection="surrounding", templates=["a photo of {}"], lambda_reg=1e-8,
                           lambda_preserve=0.0, probe_prompts=[])
    result = ClosedFormEngine(adapter, cfg, progress=False).run([Concept("cat", "dog")])
    feats = {p: adapter.encode_text([p])["tokens"][0].double() for p in ("a photo of cat", "a photo of dog")}
    w = adapter.module("context_embedder").weight.detach().double()
    w_new = w + result.deltas["context_embedder"].double()
    target, anchor = feats["a photo of cat"] @ w_new.T, feats["a photo of dog"] @ w.T
    before = (feats["a photo of cat"] @ w.T - anchor).norm(dim=1)
    after = (target - anchor).norm(dim=1)
    assert (before[:3] > 1e-3).all()  # T5's prefix positions do carry the concept
    assert (after / before.clamp(min=1e-9)).max() < 1e-3, (after / before)


def _pred(adapter, prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(adapter.latent_shape(1), generator=g).repeat(len(prompts), 1, 1, 1)  # same latent per prompt
    t = torch.full((len(prompts),), 0.4 * adapter.time_scale)  # DDPM t = 400, flow σ = 0.4 (SD3: 400 / 1000)
    t = t.long() if adapter.time_kind == "ddpm" else t
    with torch.no_grad():
        return adapter.predict(x, t, adapter.conditioning(prompts))


SHORT = {  # 8-token prompts: all positions of "a photo of a cat" fit in the tiny 32/64-d text features
    "sd": lambda: tiny_sd_pipeline(max_length=8),
    "sd2v": lambda: tiny_sd_pipeline(prediction_type="v_prediction", max_length=8),
    "sdxl": lambda: tiny_sdxl_pipeline(max_length=8),
    "flux": lambda: tiny_flux_pipeline(max_length=8),
    "sd3": lambda: tiny_sd3_pipeline(max_length=8, t5_length=8),
    "sd35": lambda: tiny_sd3_pipeline(variant="sd35", max_length=8, t5_length=8),
    "sd3-no-t5": lambda: tiny_sd3_pipeline(variant="no-t5", max_length=8, t5_length=8),
}


@pytest.mark.parametrize("name", list(SHORT))
def test_erasure_makes_target_predict_like_anchor_and_spares_unrelated(name: str) -> None:
    """The provable-suppression condition: W'e = W·e_anchor on every token ⇒ the target predicts as the anchor."""
    pipe = SHORT[name]()
    adapter = get_adapter(pipe)
    target, anchor, unrelated = "a photo of a cat", "a photo of a dog", "a photo of a boat"
    before = _pred(adapter, [target, anchor, unrelated])
    # one solve (rectified flow's default adds RECE rounds, which also move the preimage and so leave a residual)
    er = erase(pipe, ["cat"], anchor="dog", preserve=["boat"], progress=False, rece_rounds=0,
               token_selection="all", templates=["a photo of a {}"], lambda_reg=1e-6, preserve_corpus=None)
    assert er.certificate["summary"]["erasure_residual_max"] < 1e-3
    er.apply(pipe)
    after = _pred(adapter, [target, anchor, unrelated])
    gap_before = float((before[0] - before[1]).norm())
    gap_after = float((after[0] - before[1]).norm())
    assert gap_before > 1e-3
    assert gap_after < 0.02 * gap_before, (gap_before, gap_after)
    moved_unrelated = float((after[2] - before[2]).norm())
    assert moved_unrelated < 0.02 * gap_before, (moved_unrelated, gap_before)


def test_default_method_narrows_target_anchor_gap() -> None:
    """With the default (all templates, all padding), predictions for the target move towards the anchor's."""
    pipe = BUILDERS["sd"]()
    adapter = get_adapter(pipe)
    before = _pred(adapter, ["a photo of a cat", "a photo of a dog"])
    erase(pipe, ["cat"], anchor="dog", progress=False).apply(pipe)
    after = _pred(adapter, ["a photo of a cat", "a photo of a dog"])
    assert (after[0] - before[1]).norm() < 0.8 * (before[0] - before[1]).norm()


def test_saved_lora_loads_with_plain_diffusers_and_matches_in_memory_edit(tmp_path, saved_models) -> None:
    from diffusers import DiffusionPipeline

    for name in ("sd", "sdxl", "flux", "sd3"):
        pipe = DiffusionPipeline.from_pretrained(saved_models[name])
        adapter = get_adapter(pipe)
        er = erase(pipe, ["cat"], anchor="dog", progress=False)
        er.save(tmp_path / name)
        # in-memory edit: a copy of the denoiser with W += ΔW
        edited = copy.deepcopy(pipe)
        ad_edit = get_adapter(edited)
        with torch.no_grad():
            for module, delta in er.deltas().items():
                ad_edit.module(module).weight += delta.float()
        fresh = DiffusionPipeline.from_pretrained(saved_models[name])
        fresh.load_lora_weights(str(tmp_path / name))  # what a plain diffusers user does
        ad_fresh = get_adapter(fresh)
        prompts = ["a photo of a cat", "a red car"]
        diff = (_pred(ad_edit, prompts) - _pred(ad_fresh, prompts)).abs().max()
        assert diff <= 1e-4, (name, float(diff))
        assert (_pred(adapter, prompts) - _pred(ad_fresh, prompts)).abs().max() > 1e-4  # the edit does something


def test_flux_add_kv_option_uses_hooked_block_inputs() -> None:
    pipe = tiny_flux_pipeline(max_length=8)
    adapter = get_adapter(pipe)
    cfg = ClosedFormConfig(targets="add_kv", token_selection="target", templates=["a photo of a {}"],
                           lambda_reg=1e-6, probe_prompts=[])
    engine = ClosedFormEngine(adapter, cfg, progress=False)
    assert [s.modules for s in engine.streams] == [["transformer_blocks.0.attn.add_k_proj",
                                                    "transformer_blocks.0.attn.add_v_proj"]]
    result = engine.run([Concept("cat", "dog")])
    # one row per concept token per observed σ (3 states)
    assert result.counts["block0"]["erase"] == 3
    assert max(c["erasure_residual"] for c in result.certificate.values()) < 1e-3
    assert set(result.deltas) == {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"}


def test_certificate_from_grams_matches_row_norms() -> None:
    """The Gram-based certificate equals the norms computed directly on the rows."""
    from trace_erase.engines.certificate import StreamCertifier
    from trace_erase.engines.closed_form import GramStats

    torch.manual_seed(0)
    d, out = 12, 7
    e, a, p, q = (torch.randn(n, d, dtype=torch.float64) for n in (20, 20, 30, 15))
    st = GramStats(d)
    st.add_erase(e, a)
    st.add_preserve(p)
    st.add_probe(q)
    s = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, dtype=torch.float64)
    w = torch.randn(out, d, dtype=torch.float64)
    cert = StreamCertifier(st, s)(w)
    w_new, delta = w @ s, w @ s - w
    wa = a @ w.T
    assert cert["erasure_residual"] == pytest.approx(float((e @ w_new.T - wa).norm() / wa.norm()), rel=1e-9)
    assert cert["erasure_residual_before"] == pytest.approx(float((e @ w.T - wa).norm() / wa.norm()), rel=1e-9)
    assert cert["collateral_preserve"] == pytest.approx(float((p @ delta.T).norm() / (p @ w.T).norm()), rel=1e-9)
    assert cert["collateral_probe"] == pytest.approx(float((q @ delta.T).norm() / (q @ w.T).norm()), rel=1e-9)


def test_builtin_corpus_drops_captions_naming_the_concept_or_anchor() -> None:
    from trace_erase.engines.closed_form import DEFAULT_PROBES
    from trace_erase.engines.prompts import read_corpus

    full = read_corpus("builtin")
    assert len(full) >= 100
    assert not set(full) & set(DEFAULT_PROBES)  # the collateral certificate's probes stay unseen by the solve
    kept = read_corpus("builtin", [Concept("cat", "dog")])
    dropped = set(full) - set(kept)
    assert dropped and all(any(w in c.split() for w in ("cat", "dog", "dogs")) for c in dropped)
    assert not any(w in c.split() for c in kept for w in ("cat", "dog", "dogs"))


def test_preserve_corpus_lowers_collateral_on_unseen_probes(tmp_path) -> None:
    """Preserving a corpus of unrelated captions moves unrelated (probe) prompts less; the erasure still happens.
    (λ_p 0.3: the random tiny encoder's token features are nearly collinear, so at λ_p 1 the 24 preserved rows
    outvote the 2 erased ones; on toy-sd the built-in corpus at λ_p 1 keeps Acc_e at 0.)"""
    adapter = get_adapter(BUILDERS["sd"]())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red car\na tree in the city\na house by the sea\n")
    summaries = {}
    for path in (None, str(corpus)):
        cfg = ClosedFormConfig(preserve_corpus=path, token_selection="target", lambda_reg=0.01, lambda_preserve=0.3,
                               templates=["a photo of a {}", "{} in a landscape"],
                               probe_prompts=["a blue car", "a tree by the sea"])
        cert = ClosedFormEngine(adapter, cfg, progress=False).run([Concept("cat", "dog")]).certificate.values()
        summaries[path] = (max(c["collateral_probe"] for c in cert), max(c["erasure_residual"] for c in cert),
                           min(c["erasure_residual_before"] for c in cert))
    (probe_none, _, _), (probe_corpus, residual, before) = summaries[None], summaries[str(corpus)]
    assert probe_corpus < 0.7 * probe_none, summaries
    assert residual < 0.5 * before, summaries


def test_missing_or_empty_corpus_is_one_line_error(tmp_path) -> None:
    from trace_erase.engines.prompts import read_corpus

    with pytest.raises(TraceEraseError, match="does not exist"):
        read_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(TraceEraseError, match="is empty"):
        read_corpus(str(tmp_path / "empty.txt"))


def test_rece_round_erases_the_conditioning_that_still_recovered_the_concept() -> None:
    """RECE-style rounds: M is the ridge least-squares conditioning through W·S, and after one round the conditioning
    found against plain stage A no longer gives the concept's outputs back, while the concept stays erased."""
    from trace_erase.engines.rece import adversarial_map, projection_gram, recovered

    adapter = get_adapter(BUILDERS["sd"]())
    concepts = [Concept("cat", "dog")]
    plain = ClosedFormEngine(adapter, ClosedFormConfig(templates=["{}", "a photo of {}"], probe_prompts=[]),
                             progress=False)
    stream = plain.streams[0]
    st = plain.statistics(concepts)[stream.name]
    s1, none = plain.solve(stream, st)
    assert none == []
    weights = [adapter.module(n).weight.detach().double() for n in stream.modules]
    k = projection_gram(weights)
    m1 = adversarial_map(s1, k, 0.01)
    # M against the stacked least squares of Σ_l ||W_l S c' − W_l c||² + μ||c'||²
    c = torch.randn(st.dim, dtype=torch.float64)
    mu = 0.01 * float(torch.trace(s1.T @ k @ s1)) / st.dim
    x = torch.cat([*(w @ s1 for w in weights), mu**0.5 * torch.eye(st.dim, dtype=torch.float64)])
    y = torch.cat([*(w @ c for w in weights), torch.zeros(st.dim, dtype=torch.float64)])
    assert torch.allclose(m1 @ c, torch.linalg.lstsq(x, y[:, None]).solution[:, 0], rtol=1e-5, atol=1e-8)

    rece = ClosedFormEngine(adapter, ClosedFormConfig(templates=["{}", "a photo of {}"], probe_prompts=[],
                                                      rece_rounds=1), progress=False)
    s2, history = rece.solve(stream, st)
    assert history == [pytest.approx(recovered(s1, m1, k, st))]
    before, after = recovered(s1, m1, k, st), recovered(s2, m1, k, st)
    assert before > 0.9 and after < 0.5 * before, (before, after)  # the round-1 conditioning no longer works
    result = rece.run(concepts)
    assert set(result.rece) == {s.name for s in rece.streams}
    assert max(cert["erasure_residual"] for cert in result.certificate.values()) < 0.5
    with pytest.raises(TraceEraseError, match="rece_rounds must be ≥ 0"):
        ClosedFormConfig(rece_rounds=-1)
    with pytest.raises(TraceEraseError, match="rece_lambda must be > 0"):
        ClosedFormConfig(rece_lambda=0)
