"""Several concepts with per-concept stage-B LoRAs (``--multi fuse|sum``): train one LoRA per concept from the
(joint) stage-A model — resumable concept by concept — then combine them (engines/fusion.py).

Each finished concept is saved in ``WORKDIR/concept-NNN/lora.safetensors`` with the hash of its run settings; a
resumed run loads the finished ones and continues the interrupted one from its own checkpoint. Under ``accelerate
launch`` the concepts are shared out over the processes (concept i on process i mod n); every process then reads
all finished concepts and the main one writes the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from .artifacts.lora import pairs_to_state
from .config import Concept, config_hash
from .engines.closed_form import ClosedFormConfig, ClosedFormEngine
from .engines.fusion import FusionInputs, certificate, fuse, retained_basis
from .engines.stage_a import StageAWeights
from .engines.trajectory import TrajectoryConfig, TrajectoryEngine
from .errors import TraceEraseError
from .methods import MethodSpec
from .models import FamilyAdapter
from .runtime import process_state

CONCEPT_LORA = "lora.safetensors"
FUSION_WEIGHT_NAME = "fusion_factors.safetensors"


def resolve_multi(spec: MethodSpec, multi: str | None, n_concepts: int) -> str:
    """The multi-concept mode to run: refuses ``fuse``/``sum`` for a method without stage B (one line)."""
    if multi is not None and multi not in ("fuse", "joint", "sum"):
        raise TraceEraseError(f"unknown --multi '{multi}'; choose fuse, joint or sum")
    if multi in ("fuse", "sum") and not spec.uses_trajectory:
        raise TraceEraseError(f"--multi {multi} combines per-concept stage-B LoRAs, and '{spec.name}' has no stage "
                              "B; use --multi joint (one solve over all concepts)")
    if n_concepts < 2:
        return "single"
    return multi or spec.multi_default


def process_rank() -> int:
    """This process's index under ``accelerate launch`` (0 alone)."""
    return process_state().process_index


def _save(path: Path, state: dict[str, torch.Tensor], run_hash: str, train_seconds: float) -> None:
    from safetensors.torch import save

    from .io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(state, metadata={"format": "pt", "run_hash": run_hash,
                                             "train_seconds": f"{train_seconds:.3f}"}))


def _trained_seconds(path: Path) -> float | None:
    """How long a saved per-concept LoRA took to train (None for files saved before that was recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get("train_seconds")
    return float(value) if value is not None else None


def _load_done(path: Path | None, run_hash: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("run_hash") != run_hash:
            raise TraceEraseError(f"'{path}' was trained with other settings; pass --overwrite to start afresh")
    return load_file(str(path))


def train_per_concept(adapter: FamilyAdapter, cfg: TrajectoryConfig, concepts: list[Concept],
                      stage_a: StageAWeights | None, workdir: Path | None, run_config: dict[str, Any],
                      progress: bool) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """One stage-B LoRA per concept (diffusers keys), trained from the stage-A model; and a log."""
    state = process_state()
    rank, world = state.process_index, state.num_processes
    states: list[dict[str, torch.Tensor] | None] = [None] * len(concepts)
    hashes: list[str] = []
    logs: dict[str, Any] = {"final_losses": {}, "train_seconds": 0.0, "steps": cfg.steps, "resumed": []}
    for i, concept in enumerate(concepts):
        sub = workdir / f"concept-{i:03d}" if workdir else None
        engine = TrajectoryEngine(adapter, cfg, progress=progress, workdir=sub,
                                  run_config={**run_config, "concept_index": i}, stage_a=stage_a)
        run_hash = config_hash({**engine.run_config, "concepts": [dataclasses.asdict(concept)]})
        hashes.append(run_hash)
        if i % world != rank:  # another process's share
            continue
        done = _load_done(sub / CONCEPT_LORA if sub else None, run_hash)
        if done is not None:
            states[i] = done
            logs["resumed"].append(concept.name)
            seconds = _trained_seconds(sub / CONCEPT_LORA)
            if seconds is not None:  # what the reused LoRA cost, so an erasure's time counts it (bench's erase s)
                logs["resumed_train_seconds"] = logs.get("resumed_train_seconds", 0.0) + seconds
            continue
        with stage_a.applied() if stage_a else contextlib.nullcontext():
            log = engine.train([concept])
        states[i] = log["state_dict"]
        logs["final_losses"][concept.name] = log["final_losses"]
        if "adversarial_losses" in log:
            logs.setdefault("adversarial_losses", {}).update(log["adversarial_losses"])
        if "bank_search" in log:
            logs.setdefault("bank_search", {}).update(log["bank_search"])
        if "attention_fallback" in log:
            logs.setdefault("attention_fallback", {})[concept.name] = log["attention_fallback"]
        logs["train_seconds"] += log["train_seconds"]
        if sub is not None:
            _save(sub / CONCEPT_LORA, log["state_dict"], run_hash, log["train_seconds"])
    if world > 1:  # every process reads what the others trained
        if workdir is None:
            raise TraceEraseError("several processes need a workdir to exchange per-concept LoRAs; pass --output")
        state.wait_for_everyone()
        logs["other_processes"] = [c.name for i, c in enumerate(concepts) if states[i] is None]
        for i in range(len(concepts)):
            if states[i] is None:
                states[i] = _load_done(workdir / f"concept-{i:03d}" / CONCEPT_LORA, hashes[i])
    return [s for s in states if s is not None], logs


def fusion_inputs(adapter: FamilyAdapter, concepts: list[Concept], states: list[dict[str, torch.Tensor]],
                  stats_config: ClosedFormConfig, mode: str, stats: tuple[list, dict] | None = None,
                  null_space: float = 0.0, observed: bool = False,
                  stage_a: StageAWeights | None = None) -> FusionInputs:
    """Per-concept factors and, for ``fuse``, the token Grams of the text streams the LoRA modules read (``stats``:
    stage A's per-concept statistics when it gathered them, else gathered here with ``stats_config``); with
    ``null_space`` > 0 also the Gram of the retained prompts' tokens (:func:`retained_grams`). ``observed``: where
    no trained module reads those streams, the Grams of the adapter's ``fusion_targets`` streams instead, observed
    with stage A applied (the model the LoRAs were trained on)."""
    from .artifacts.lora import lora_pairs

    # float32 as trained: fuse() and certificate() widen one module at a time (held as float64, 100 concepts' factors
    # at SD-1.4 size cost ~80 MB more at the peak)
    factors = [{m: (a.float(), b.float()) for m, (a, b) in lora_pairs(s, adapter.denoiser_name).items()}
               for s in states]
    if mode != "fuse":
        return FusionInputs(factors, {}, [{} for _ in concepts], {})
    engine = ClosedFormEngine(adapter, stats_config, progress=False)
    trained = {m for f in factors for m in f}
    module_stream = fusable_streams(engine, trained)
    context = contextlib.nullcontext()
    if not module_stream and observed and adapter.fusion_targets is not None:
        engine = ClosedFormEngine(adapter, dataclasses.replace(stats_config, targets=adapter.fusion_targets),
                                  progress=False)
        module_stream = fusable_streams(engine, trained, hooked=True)
        stats = None  # stage A's statistics are of its own streams
        context = stage_a.applied() if stage_a is not None else context
    read = set(module_stream.values())  # only these Grams are used (and saved): FLUX/SD3 stage B reads none
    if not read:  # nothing to integrate in closed form: no encoding pass
        return FusionInputs(factors, {}, [{} for _ in concepts], {})
    with context:
        per, joint = stats if stats is not None else engine.concept_statistics(concepts)
        retained = retained_grams(engine, concepts, read) if null_space > 0 else {}
    grams = [{name: cg.g_e for name, cg in p.items() if name in read} for p in per]
    # P per row of an average concept (ours): λ_p = 1 weighs the preserved tokens as much as one concept's own
    # tokens, whatever the corpus size (the raw sum over ~120 captions × every position would swamp each Cᵢ)
    preserve = {}
    for name, st in ((n, st) for n, st in joint.items() if n in read):
        concept_rows = st.counts["erase"] / max(len(per), 1)
        rows = st.counts["preserve"]
        preserve[name] = st.g_p * (concept_rows / rows) if rows else st.g_p
    return FusionInputs(factors, module_stream, grams, preserve, retained,
                        observed=any(s.hooked for s in engine.streams if s.name in read))


def fusable_streams(engine: ClosedFormEngine, trained: set[str], hooked: bool = False) -> dict[str, str]:
    """Trained module → the per-token text stream it reads as a whole (hooked streams only when ``hooked``)."""
    return {m: s.name for s in engine.streams if s.per_token and s.columns is None and (hooked or not s.hooked)
            for m in s.modules if m in trained}


def retained_prompts(templates: list[str], concepts: list[Concept]) -> list[str]:
    """What a fusion's null space keeps exactly: every ``--preserve`` text of the concepts in every template, and the
    empty prompt (whose states the unconditional branch of guidance reads)."""
    from .engines.prompts import fill

    named = dict.fromkeys(p for c in concepts for p in c.preserve)
    return list(dict.fromkeys([fill(t, p)[0] for p in named for t in templates] + [""]))


def retained_grams(engine: ClosedFormEngine, concepts: list[Concept], streams: set[str]) -> dict[str, torch.Tensor]:
    """Per stream, Σ e eᵀ over every token (all positions, BOS and padding included) of :func:`retained_prompts`
    (float64)."""
    feats = engine.encode(retained_prompts(engine.templates, concepts), "encoding retained prompts")
    out: dict[str, torch.Tensor] = {}
    for f in feats.values():
        for name in streams:
            e = f[name].double().reshape(-1, f[name].shape[-1])
            out[name] = out.get(name, 0) + e.T @ e
    return out


def combine(adapter: FamilyAdapter, inputs: FusionInputs, cfg: TrajectoryConfig, mode: str,
            stage_a_deltas: dict[str, torch.Tensor], concepts: list[Concept],
            scales: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The combined LoRA (diffusers keys) and the manifest's ``fusion`` record (modes, rank slices, certificate)."""
    null_space = cfg.fusion.null_space if inputs.retained else 0.0
    growth = cfg.fusion.preserve_growth
    fused, how, slices = fuse(inputs, cfg.fusion.lam, cfg.fusion.lam_preserve, scales, mode, null_space, growth)
    state = pairs_to_state(fused, adapter.denoiser_name)
    record: dict[str, Any] = {"mode": mode, "lambda": cfg.fusion.lam, "lambda_preserve": cfg.fusion.lam_preserve,
                              **({"null_space": null_space, "null_space_rank": {
                                  s: int(retained_basis(g, null_space).shape[1]) for s, g in inputs.retained.items()}}
                                 if null_space > 0 else {}),
                              **({"preserve_growth": growth} if growth else {}),
                              **({"observed_grams": True} if inputs.observed else {}),
                              "modules": how, "module_streams": inputs.module_stream, "weight_name": FUSION_WEIGHT_NAME,
                              "concepts": [{"name": c.name, "rank_slice": list(sl)}
                                           for c, sl in zip(concepts, slices, strict=True)]}
    if mode == "fuse" and inputs.module_stream:
        weights = {m: adapter.module(m).weight.detach().double().cpu() + stage_a_deltas.get(m, 0)
                   for m in inputs.module_stream}
        for c, cert in zip(record["concepts"], certificate(inputs, fused, weights), strict=True):
            c["certificate"] = cert
    return state, record
