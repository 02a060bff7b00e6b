"""EraseAnything (methods/eraseanything.py, engines/eraseanything.py) and FLUX's attention probe on tiny fixtures."""

from __future__ import annotations

import pytest
import torch

from trace_erase import get_adapter
from trace_erase.config import Concept
from trace_erase.engines.eraseanything import ConceptMasks, attention_penalty, contrast_loss
from trace_erase.engines.trajectory import TrajectoryConfig, TrajectoryEngine
from trace_erase.errors import TraceEraseError

from .conftest import BUILDERS, run_cli

FAST = {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1, "batch_size": 2, "checkpoint_every": 1000}


def _flux():
    adapter = get_adapter(BUILDERS["flux"]())
    adapter.resolution = 32  # 8 × 8 image tokens: the fixture's default 64 × 64 is slow for a unit test
    return adapter


def test_probe_reads_the_attention_the_block_computes() -> None:
    """Known answer: with text values 1 and image values 0, the attention output of an image query is, per head,
    its attention mass on the text tokens — the probe's map for an all-text mask must equal its head mean. The
    block's outputs are the same with and without the probe."""
    adapter = _flux()
    attn = adapter.denoiser.transformer_blocks[0].attn
    with torch.no_grad():
        attn.to_v.weight.zero_()
        attn.to_v.bias.zero_()
        attn.add_v_proj.weight.zero_()
        attn.add_v_proj.bias.fill_(1.0)
    seen = []
    attn.to_out[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    cond = adapter.conditioning(["a photo of a cat", "a red dog"])
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.3])
    plain = adapter.predict(x, t, cond)
    n_text = cond.tensors["encoder_hidden_states"].shape[1]
    with adapter.token_attention(torch.ones(2, n_text)) as maps:
        probed = adapter.predict(x, t, cond)
    assert torch.equal(plain, probed)
    per_head = seen[-1].unflatten(-1, (attn.heads, attn.head_dim))[..., 0]  # [B, N_img, heads]
    assert len(maps) == 1 and maps[0].shape == per_head.shape[:2]
    torch.testing.assert_close(maps[0], per_head.mean(-1), atol=1e-5, rtol=1e-4)
    # a one-position mask reads a part of it; the processors are restored afterwards
    with adapter.token_attention(torch.nn.functional.one_hot(torch.tensor([4, 4]), n_text).float()) as part:
        adapter.predict(x, t, cond)
    assert (part[0] < maps[0]).all() and (part[0] > 0).all()
    assert type(attn.processor).__name__ == "FluxAttnProcessor"


def test_concept_mask_marks_the_concept_tokens_only() -> None:
    eng = TrajectoryEngine(_flux(), TrajectoryConfig.from_options(**FAST), progress=False)
    mask = ConceptMasks(eng.adapter, [Concept("cat")])(["a photo of a cat", "black cat"])
    tok = eng.adapter.token_tokenizer
    for row, prompt in zip(mask, ["a photo of a cat", "black cat"], strict=True):
        ids = tok(prompt)["input_ids"]
        marked = [ids[i] for i in row.nonzero().flatten().tolist()]
        assert tok.decode(marked).strip() == "cat"
    with pytest.raises(TraceEraseError, match="names no concept"):
        ConceptMasks(eng.adapter, [Concept("cat")])(["a photo of a dog"])


def test_contrast_loss_pushes_the_map_away_from_the_concept_and_towards_irrelevant_ones() -> None:
    """Lower when the trained map looks like an irrelevant concept's than like the concept's; gradient descent on
    it lowers the map's cosine similarity to the concept's reference."""
    gen = torch.Generator().manual_seed(0)
    negative, irrelevant = torch.rand(1, 16, generator=gen), torch.rand(1, 3, 16, generator=gen)
    like_concept = contrast_loss(negative.clone(), negative, irrelevant, 0.07)
    like_other = contrast_loss(irrelevant[:, 0].clone(), negative, irrelevant, 0.07)
    assert like_other < like_concept
    center = (negative + 0.1 * torch.rand(1, 16, generator=gen)).requires_grad_(True)
    cos = lambda a: torch.nn.functional.cosine_similarity(a, negative).item()  # noqa: E731
    before = cos(center.detach())
    opt = torch.optim.SGD([center], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        contrast_loss(center, negative, irrelevant, 0.07).backward()
        opt.step()
    assert cos(center.detach()) < before - 0.01


def _concept_attention(eng: TrajectoryEngine, x: torch.Tensor, t: torch.Tensor) -> float:
    prompts = ["a photo of a cat"] * x.shape[0]
    with torch.no_grad(), eng.adapter.token_attention(ConceptMasks(eng.adapter, eng.concepts)(prompts)) as maps:
        eng.adapter.predict(x, t, eng.cond(prompts))
    return float(attention_penalty(maps))


def test_attention_regulariser_moves_attention_off_the_concept_tokens() -> None:
    """Six steps with the regulariser leave less attention on the concept's tokens than the same steps without it
    (same states, seeds and erase loss); its term is the penalty of the probe's maps on the concept mask."""
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.8, 0.2])
    after = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        eng = TrajectoryEngine(_flux(), TrajectoryConfig.from_options(**FAST, lora_targets="kq", lr=1e-2, window="all",
                                                         attention_weight=weight), progress=False)
        eng.concepts = [Concept("cat")]
        before = _concept_attention(eng, x, t)
        eng.attach()
        try:
            params = eng.lora_parameters()
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=1e-2)
            for _ in range(6):
                opt.zero_grad()
                terms = eng.loss_terms(x, t, ["a photo of a cat"] * 2, [], backward_scale=1.0)
                opt.step()
            after[weight] = _concept_attention(eng, x, t)
        finally:
            eng.detach()
        if weight:
            assert float(terms["attn"]) > 0
    assert after[50.0] < 0.8 * before
    assert after[50.0] < 0.8 * after[0.0]


def test_bilevel_steps_alternate_between_upper_and_lower_terms() -> None:
    """Step 0 is an upper step (erase and attention terms, no flow or contrast); step 1 a lower one."""
    logs = {}
    for steps in (1, 2):
        eng = TrajectoryEngine(_flux(), TrajectoryConfig.from_options(
            **{**FAST, "steps": steps}, lora_targets="kq", window="all", bilevel=True, attention_weight=1e-3,
            flow_weight=0.1, contrast_weight=0.1, contrast_irrelevant=2),
                               progress=False)
        logs[steps] = eng.train([Concept("cat", preserve=["a dog", "a tree"])])["final_losses"]
    assert logs[1]["erase"] > 0 and logs[1]["attn"] > 0 and logs[1]["flow"] == 0 and logs[1]["contrast"] == 0
    assert logs[2]["flow"] > 0 and logs[2]["contrast"] != 0
    assert logs[2]["erase"] == pytest.approx(logs[1]["erase"] / 2, rel=1e-4)  # averaged with the lower step's 0


def test_eraseanything_trains_its_layer_set_with_every_term() -> None:
    """The registered configuration: rank-8 LoRA on add_k/add_q only; two steps give the upper and lower terms."""
    from trace_erase.api import method_configs
    from trace_erase.methods import get_method

    _, cfg = method_configs(get_method("eraseanything"), {"steps": 2, "rollout_steps": 4, "pool_trajectories": 1})
    eng = TrajectoryEngine(_flux(), cfg, progress=False)
    assert eng.targets and all(m.endswith(("attn.add_k_proj", "attn.add_q_proj")) for m in eng.targets)
    log = eng.train([Concept("cat")])  # no preserve prompts: the irrelevant ones come from the built-in corpus
    assert all(v.shape[0] == 8 for k, v in log["state_dict"].items() if "lora_A" in k)
    final = log["final_losses"]
    assert final["erase"] > 0 and final["attn"] > 0 and final["flow"] > 0 and final["contrast"] != 0


def test_eraseanything_refuses_other_families_before_loading_and_bad_options(tmp_path) -> None:
    # a folder with only its model_index.json: a load would fail with another message, so the refusal comes first
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for cmd in (["erase", "--concept", "cat", "--method", "eraseanything", "--output", str(tmp_path / "o")],
                ["bench", "--methods", "trace,eraseanything", "--concepts", "circle", "--output", str(tmp_path / "b")]):
        res = run_cli([*cmd, "--model", str(tmp_path / "sd")])
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "'eraseanything' does not support sd" in lines[0] and "flux" in lines[0], lines
    with pytest.raises(TraceEraseError, match="bilevel"):
        TrajectoryConfig.from_options(flow_weight=0.1)
    with pytest.raises(TraceEraseError, match="lower-step term"):
        TrajectoryConfig.from_options(bilevel=True)
    with pytest.raises(TraceEraseError, match="contrast_temperature"):
        TrajectoryConfig.from_options(contrast_temperature=0)
    with pytest.raises(TraceEraseError, match="FLUX-only"):
        get_adapter(BUILDERS["sd"]()).token_attention(torch.ones(1, 4))
