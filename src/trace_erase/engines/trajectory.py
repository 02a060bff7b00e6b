"""The trajectory engine: TRACE stage B, ESD and ANT are configurations of it.

A LoRA θ = θ* + ΔW is trained on states x_t taken from trajectories of the stage-A model θ* under the target
prompt. The stage-A predictions come from the same network with the LoRA disabled (no second copy of the model).
With τ splitting the model's time into EARLY (t ≥ τ, layout) and LATE (t < τ, details):

    LATE:  L_erase = ||ε_θ(x,t,c) − [ε*(x,t,∅) − η(ε_r(x,t,c) − ε_r(x,t,∅))]||²   (reversed guidance)
    EARLY: L_keep  = ||ε_θ(x,t,c) − ε*(x,t,c)||²                               (trajectory constraint)
           (ANT: L_pos = ||ε_θ(x,t,c) − [ε*(∅) + η(ε*(c) − ε*(∅))]||², positive guidance before its cut-off)
    ALL:   L_unc   = ||ε_θ(x,t,∅) − ε*(x,t,∅)||² ;  L_pres over preserve prompts likewise.

ε stands for whatever the family predicts (ε, v or flow velocity): the losses are the same in each. With TRCE's terms
on (``trce``; engines/trce.py) its hinge and preservation terms replace all of these. With the preimage branch on
(``preimage``; engines/preimage.py) the prediction in L_erase and L_keep is also taken at the conditioning through which
θ* gives back θ0's K/V for the concept prompt, against the same targets.

With ``keep_end="clean"`` (ANT's single-concept code) the windows swap sides of τ: the EARLY term applies at t < τ,
L_erase at t ≥ τ (engines/windows.py, which also draws ``window_sampling="balanced"`` batches).

θ* is the model stage B starts from (stage A applied, when the method has one). The reference r that gives the
concept direction and draws the trajectories is ``reference``: ``stage-a`` (r = θ*) or ``original`` (r = θ0, the
model before stage A: stage A has already weakened θ*'s concept direction, so a target built from it asks little).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Concept
from ..errors import NonFiniteLossError, TraceEraseError
from ..models.base import Conditioning, FamilyAdapter
from ..models.text_lora import lora_key
from ..runtime import check_trainable, finite_gradients, training_attention
from .adversarial import AdversarialPrompts
from .bank import Bank
from .checkpointing import CHECKPOINT_NAME, CheckpointMixin
from .eraseanything import ConceptMasks, attention_penalty, lower_terms
from .lora_switch import ADAPTER_NAME, LoraSwitchMixin
from .pool import Pool
from .preimage import TERMS as PREIMAGE_TERMS
from .preimage import PreimageMap
from .preimage import term_weights as preimage_weights
from .prompts import load_corpus
from .rollouts import RolloutMixin
from .stage_a import StageAWeights
from .trajectory_config import EraseAnythingConfig, TrajectoryConfig
from .trce import safe_prompts, trce_terms
from .trce import term_weights as trce_weights
from .windows import erase_window

__all__ = ["ADAPTER_NAME", "CHECKPOINT_NAME", "TrajectoryConfig", "TrajectoryEngine", "late_fraction",
           "reversed_guidance"]


class TrajectoryEngine(RolloutMixin, LoraSwitchMixin, CheckpointMixin):
    """Trains a LoRA on the adapter's denoiser; the pipeline's own weights are never changed."""

    adapter_name = ADAPTER_NAME

    def __init__(self, adapter: FamilyAdapter, config: TrajectoryConfig, progress: bool = True,
                 workdir: str | Path | None = None, run_config: dict[str, Any] | None = None,
                 stage_a: StageAWeights | None = None):
        self.adapter = adapter
        self.stage_a = stage_a  # θ* = θ0 + stage A's ΔW while training (None: θ* = θ0)
        self.config = config
        # what a checkpoint must match to be resumed: the whole run (method, stage A, concepts, base weights)
        free = TrajectoryConfig.resume_free_keys()  # options that do not change the trained weights
        self.run_config = {**(run_config or {}), "trajectory": {
            k: v for k, v in config.options().items() if k not in free}}
        self.progress = progress
        self.workdir = Path(workdir) if workdir else None
        self.gen = torch.Generator().manual_seed(config.seed)
        self.targets = self._targets()
        self._cond_cache: dict[str, Conditioning] = {}
        self.adversarial: AdversarialPrompts | None = None  # the defence's slots while training with it
        self.concepts = []  # what train() erases (the attention terms locate their tokens)
        self._preimage: PreimageMap | None = None  # the preimage branch's map, built at first use (engines/preimage.py)
        self.bank: Bank | None = None  # the bank branch's searched conditionings while training (engines/bank.py)
        check_trainable(adapter.device, adapter.dtype)
        # fp16 activations need loss scaling to keep small gradients (bf16 and fp32 do not)
        self.scaler = torch.amp.GradScaler(adapter.device.type) if adapter.dtype == torch.float16 else None

    def _targets(self) -> list[str]:
        """The modules the LoRA trains (denoiser-relative names)."""
        return self.adapter.lora_target_modules(self.config.lora_targets)

    # ---- conditioning and trajectories -----------------------------------------------------------------------------
    @property
    def concepts(self) -> list[Concept]:
        return self._concepts

    @concepts.setter
    def concepts(self, concepts: list[Concept]) -> None:
        """Setting the concepts also sets where the attention terms find their tokens."""
        self._concepts = list(concepts)
        self.concept_masks = ConceptMasks(self.adapter, self._concepts)

    def anchor_prompt(self, prompt: str) -> str:
        """``prompt`` with the concept it names (the longest name it contains) replaced by that concept's anchor."""
        names = sorted((c for c in self.concepts if c.name.lower() in prompt.lower()), key=lambda c: -len(c.name))
        if not names:
            raise TraceEraseError(f"the training prompt '{prompt}' names no concept; reference=anchor needs one")
        i = prompt.lower().index(names[0].name.lower())
        return " ".join((prompt[:i] + names[0].anchor + prompt[i + len(names[0].name):]).split())

    # ---- losses ----
    def loss_terms(self, x: torch.Tensor, t: torch.Tensor, prompts: list[str], preserve: list[str],
                   backward_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Each loss term (mean over the batch, masked by window) and the weighted total.

        With ``backward_scale`` the gradients of ``backward_scale · total`` are accumulated here, branch by branch
        when ``branches="sequential"`` (so only one branch's activations are alive), and the terms come back
        detached."""
        cfg = self.config
        n = x.shape[0]
        c, u = self.cond(prompts), self.cond([""] * n)
        use_unc = cfg.gamma > 0
        use_pres = cfg.rho > 0 and bool(preserve)
        ref_conds, live = [c, u], {"c": c} | ({"u": u} if use_unc else {})
        if self.adversarial is not None:
            live["a"] = self.adversarial.cond(prompts)
        if cfg.preimage is not None:  # the concept prompt through the conditioning that undoes stage A
            live["pre"] = self.preimage_map()(c)
        if self.bank is not None:  # per row, an entry of its concept's adversarial bank
            live["bank"] = self.bank.draw(prompts)
        if use_pres:
            i = int(torch.randint(0, len(preserve), (1,), generator=self.gen))
            p = self.cond([preserve[i]] * n)
            ref_conds.append(p)
            live["p"] = p
        # θ* (the stage-A model) for (c, ∅[, p]) in one call without gradients
        with torch.no_grad(), self.stage_a_model():
            k = len(ref_conds)
            ref = self.adapter.predict(x.repeat(k, 1, 1, 1), t.repeat(k), Conditioning.cat(ref_conds)).chunk(k)
        e_c, e_u = ref[0], ref[1]
        # the concept direction: θ*'s own, or θ0's (reference="original", stage A taken out); "anchor": θ0's concept
        # relative to its anchor, reversed from θ*'s prediction (ours: it cannot point back past the anchor)
        r_c, r_u = e_c, e_u
        if cfg.reference == "original" and self.stage_a is not None:
            with torch.no_grad(), self.original():
                r_c, r_u = self.adapter.predict(x.repeat(2, 1, 1, 1), t.repeat(2), Conditioning.cat([c, u])).chunk(2)
        # the states the erase term applies to: LATE, unless keep_end=clean swaps the windows (engines/windows.py)
        erase_f = erase_window(self.adapter, t, cfg.window, cfg.tau, cfg.keep_end).float()
        erase_target = reversed_guidance(e_u, r_c, r_u, cfg.eta)
        if cfg.reference in ("anchor", "to-anchor"):
            # θ0's two predictions only for the rows whose erase target is read (the bank reads every row's)
            rows = torch.arange(n, device=x.device) if self.bank is not None else erase_f.nonzero().flatten()
            erase_target = e_c.clone()  # the other rows' targets are never read
            if len(rows):
                a = self.cond([self.anchor_prompt(prompts[i]) for i in rows.tolist()])
                with torch.no_grad(), self.original():
                    o_c, o_a = self.adapter.predict(x[rows].repeat(2, 1, 1, 1), t[rows].repeat(2),
                                                    Conditioning.cat([c.select(rows), a])).chunk(2)
                if cfg.reference == "anchor":
                    erase_target[rows] = e_c[rows] - cfg.eta * (o_c - o_a)
                else:
                    erase_target[rows] = o_a - (cfg.eta - 1.0) * (o_c - o_a)
        per = lambda a, b: (a.float() - b.float()).pow(2).flatten(1).mean(1)  # noqa: E731
        zero = torch.zeros((), device=x.device)
        weights = self.term_weights()
        # EraseAnything's regulariser reads the concept tokens' attention in the concept branch's forward
        ea = cfg.eraseanything
        c_mask = self.concept_masks(prompts) if ea is not None and ea.attention_weight > 0 else None
        maps: list[torch.Tensor] = []

        def concept_terms(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The concept prompt's LATE erase and EARLY losses (ANT: positive guidance before the cut-off; TRACE:
            keep θ*'s prediction for the concept prompt)."""
            l_erase = per(pred, erase_target)
            l_early = per(pred, e_u + cfg.eta * (r_c - r_u)) if cfg.early_mode == "positive" else per(pred, e_c)
            early = (l_early * (1 - erase_f)).sum() / n if cfg.early_mode != "none" else zero
            return (l_erase * erase_f).sum() / n, early

        def branch_terms(name: str, pred: torch.Tensor) -> dict[str, torch.Tensor]:
            if name == "u":
                return {"unc": per(pred, e_u).mean()}
            if name == "p":
                return {"pres": per(pred, ref[-1]).mean()}
            if name == "a":  # the adversarial prompt: the concept prompt's erase target, in the same window
                return {"adv": (per(pred, erase_target) * erase_f).sum() / n}
            if name == "pre":  # the preimage of the concept prompt: the concept prompt's targets, both windows
                return dict(zip(PREIMAGE_TERMS, concept_terms(pred), strict=True))
            if name == "bank":  # a banked adversarial conditioning: the concept prompt's erase target, every window
                return {"bank": per(pred, erase_target).mean()}
            erase, early = concept_terms(pred)
            return {"erase": erase, "early": early,
                    **({"attn": attention_penalty([m[:n] for m in maps])} if c_mask is not None else {})}

        def predict(names: list[str]) -> torch.Tensor:
            conds = Conditioning.cat([live[name] for name in names])
            xs, ts = x.repeat(len(names), 1, 1, 1), t.repeat(len(names))
            if c_mask is None or "c" not in names:
                return self.adapter.predict(xs, ts, conds)
            mask = torch.cat([c_mask if name == "c" else torch.zeros_like(c_mask) for name in names])
            with self.adapter.token_attention(mask) as sink:  # "c" comes first: its rows are [:n]
                pred = self.adapter.predict(xs, ts, conds)
            maps[:] = sink
            return pred

        terms: dict[str, torch.Tensor] = {key: zero for key in weights}
        if cfg.branches == "batched" or backward_scale is None:
            preds = predict(list(live))
            for name, pred in zip(live, preds.chunk(len(live)), strict=True):
                terms.update(branch_terms(name, pred))
            terms["total"] = sum(weights[key] * terms[key] for key in weights)
            if backward_scale is not None:
                self.backward(backward_scale * terms["total"])
                terms = {key: v.detach() for key, v in terms.items()}
            return terms
        for name in live:
            part = branch_terms(name, predict([name]))
            self.backward(backward_scale * sum(weights[key] * v for key, v in part.items()))
            terms.update({key: v.detach() for key, v in part.items()})
        terms["total"] = sum(weights[key] * terms[key] for key in weights)
        return terms

    def term_weights(self) -> dict[str, float]:
        """Each loss term's weight in the total (upper and lower steps log the same keys)."""
        cfg = self.config
        adv = cfg.adversarial.weight if cfg.adversarial is not None else 0.0
        ea = cfg.eraseanything or EraseAnythingConfig()
        return {"erase": 1.0, "early": cfg.beta, "unc": cfg.gamma, "pres": cfg.rho, "adv": adv,
                "attn": ea.attention_weight, "flow": ea.flow_weight, "contrast": ea.contrast_weight,
                **(trce_weights(cfg.trce) if cfg.trce is not None else {}),
                **(preimage_weights(cfg) if cfg.preimage is not None else {}),
                **({"bank": cfg.bank.weight} if cfg.bank is not None else {})}

    def preimage_map(self) -> PreimageMap:
        """The preimage branch's map of the stage-A edit (built at first use: ``stage_a`` may be set after the
        engine is made)."""
        if self._preimage is None:
            self._preimage = PreimageMap(self.adapter, self.stage_a, self.config.preimage.lam)
        return self._preimage

    def _nonfinite_gradients(self, step: int, loss: float, kernels: str) -> NonFiniteLossError:
        """The error for a step whose gradients are not finite although its loss is (refused before opt.step: the LoRA
        weights and the last checkpoint stay finite)."""
        cuda = self.adapter.device.type == "cuda"
        if cuda and kernels == "torch":
            fix = "rerun with --option attention_kernels=auto (it falls back to the math kernel) and --resume"
        else:
            fix = "lower lr (or eta) and rerun with --resume"
        tried = " with the math attention kernel too" if cuda and kernels == "math" else ""
        return NonFiniteLossError(f"gradients became non-finite at step {step} with a finite loss ({loss:.4g}){tried}; "
                                  f"the last checkpoint is kept — {fix}")

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (loss-scaled under fp16)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    # ---- training ----
    def train(self, concepts: list[Concept]) -> dict[str, Any]:
        """Run (or resume) training; returns the LoRA tensors in diffusers keys and a log. Detaches the adapter."""
        cfg = self.config
        self.run_config["concepts"] = [dataclasses.asdict(c) for c in concepts]
        self.concepts = concepts
        own_preserve = [p for c in concepts for p in c.preserve]
        preserve = own_preserve + (load_corpus(self.adapter, cfg.pres_corpus, concepts) if cfg.pres_corpus else [])
        # EraseAnything's irrelevant concepts: the preserve prompts, else our built-in captions
        ea = cfg.eraseanything
        contrast = ea is not None and ea.contrast_weight > 0
        irrelevant = (own_preserve or load_corpus(self.adapter, "builtin", concepts)) if contrast else []
        start = time.perf_counter()
        kernels = cfg.attention_kernels  # "auto" falls back to "math" at the first step with non-finite gradients
        fallback: dict[str, Any] | None = None
        self.attach()
        try:
            params = self.lora_parameters()
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.trce.weight_decay if cfg.trce else 0.0)
            au = cfg.advunlearn
            self.adversarial = AdversarialPrompts(
                self, concepts, restart=au is not None and au.attack_init == "random",
                signed=au is not None and au.attack == "fast_at") if cfg.adversarial is not None else None
            self.bank = Bank(self, concepts) if cfg.bank is not None else None  # searched below, or resumed
            resumed = self.load_checkpoint(opt)
            step, pool = resumed if resumed else (0, Pool())
            # every prompt training reads, encoded once now: the text encoders are idle (or offloaded) from here on
            named = [t.format(c.name) for c in concepts for t in cfg.training_templates]
            if cfg.trce is not None:
                named += list(safe_prompts(concepts, cfg.training_templates).values())
            anchors = [self.anchor_prompt(p) for p in named] if cfg.reference in ("anchor", "to-anchor") else []
            self.cond(["", *preserve, *irrelevant, *named, *anchors])
            self.fill_pool(pool, concepts)
            if self.bank is not None and not self.bank.searched:  # once, against θ* (before the LoRA trains)
                self.bank.search(pool)
            history: list[dict[str, float]] = []
            bar = tqdm(total=cfg.steps, initial=step, desc="trajectory fine-tuning", disable=not self.progress)
            while step < cfg.steps:
                with training_attention(self.adapter.device, kernels):
                    self.before_step(pool, concepts, step)
                    rng = self.gen.get_state()  # a step recomputed under another kernel draws the same batch
                    logged = self._accumulate(opt, pool, preserve, irrelevant, step)
                if self.scaler is None and not finite_gradients(params):
                    if kernels != "auto":
                        raise self._nonfinite_gradients(step, logged["total"], kernels)
                    # on CUDA the usual cause is an attention kernel's backward (cuDNN's bf16 one on H100/H200):
                    # the same step again with the reference kernel, and that kernel from here on
                    kernels, fallback = "math", {"step": step, "to": "math"}
                    bar.write(f"step {step}: non-finite gradients under a finite loss; recomputing the step with the "
                              "math attention kernel, which the rest of the run keeps")
                    self.gen.set_state(rng)
                    with training_attention(self.adapter.device, kernels):
                        logged = self._accumulate(opt, pool, preserve, irrelevant, step)
                    if not finite_gradients(params):
                        raise self._nonfinite_gradients(step, logged["total"], kernels)
                if self.scaler is not None:  # skips the step when the scaled gradients overflowed
                    self.scaler.step(opt)
                    self.scaler.update()
                    if self.scaler.get_scale() < 1.0:  # 16+ halvings from 2¹⁶: every step overflows, nothing trains
                        raise NonFiniteLossError(
                            f"fp16 gradients overflowed at every step up to step {step} (the loss scale fell below "
                            "1), so nothing was trained; the last checkpoint is kept — rerun with --dtype bf16 or "
                            "fp32 (on CUDA, or --option attention_kernels=math) and --resume")
                else:
                    opt.step()
                step += 1
                history.append(logged)
                bar.update(1)
                bar.set_postfix(loss=f"{logged['total']:.4f}", erase=f"{logged['erase']:.4f}",
                                **({"adv": f"{logged['adv']:.4f}"} if self.adversarial is not None else {}))
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self.save_checkpoint(step, opt, pool)
            bar.close()
            state = self.export()
        finally:
            self.detach()
            adversarial, self.adversarial, bank, self.bank = self.adversarial, None, self.bank, None
        window = history[-min(len(history), 50):] if history else []
        final = {k: sum(h[k] for h in window) / len(window) for k in window[0]} if window else {}
        return {"state_dict": state, "final_losses": final, "train_seconds": time.perf_counter() - start,
                "steps": cfg.steps, "target_modules": self.targets,
                **({"adversarial_losses": adversarial.losses} if adversarial is not None else {}),
                **({"bank_search": bank.log} if bank is not None else {}),
                **({"attention_fallback": fallback} if fallback else {})}

    def before_step(self, pool: Pool, concepts: list[Concept], step: int) -> None:
        """What runs before training step ``step``: the pool's refresh and the defence's attack, when due."""
        cfg = self.config
        if step > 0 and step % cfg.refresh_every == 0:
            self.refresh(pool, concepts)
        if self.adversarial is not None and step % cfg.adversarial.every == 0:
            self.adversarial.attack(pool)

    def _accumulate(self, opt: torch.optim.Optimizer, pool: Pool, preserve: list[str], irrelevant: list[str],
                    step: int) -> dict[str, float]:
        """One optimiser step's gradients (``grad_accum`` micro-batches, accumulated into the LoRA's ``.grad``) and
        the mean of each loss term; a non-finite loss is refused here, before opt.step."""
        cfg = self.config
        ea = cfg.eraseanything
        opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            if ea is not None and ea.bilevel and step % 2 == 1:  # EraseAnything's lower step
                part = lower_terms(self, self.concept_masks, pool, irrelevant, backward_scale=1.0 / cfg.grad_accum)
                terms = {key: torch.zeros(()) for key in self.term_weights()} | part
                terms["total"] = ea.flow_weight * part["flow"] + ea.contrast_weight * part["contrast"]
            elif cfg.trce is not None:  # TRCE's terms in place of the engine's losses
                part = trce_terms(self, pool, backward_scale=1.0 / cfg.grad_accum)
                terms = {key: torch.zeros(()) for key in self.term_weights()} | part
            else:
                x, t, prompts = self.sample(pool)
                terms = self.loss_terms(x, t, prompts, preserve, backward_scale=1.0 / cfg.grad_accum)
            if not torch.isfinite(terms["total"]):  # checked before opt.step: the weights stay finite
                raise NonFiniteLossError(
                    f"loss became {terms['total'].item()} at step {step}; the last checkpoint is kept — "
                    "lower lr (or eta) and rerun with --resume"
                )
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        return logged

    def export(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in diffusers keys (``{prefix}.{module}.lora_A.weight``; a text-encoder module's
        qualified name is its key), scale folded into B."""
        out = {}
        for name in self.targets:
            layer = self.trained_layer(name)
            a = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
            b = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone() * layer.scaling[ADAPTER_NAME]
            key = lora_key(name, self.adapter.denoiser_name)
            out[f"{key}.lora_A.weight"] = a
            out[f"{key}.lora_B.weight"] = b
        return out


def reversed_guidance(e_u: torch.Tensor, r_c: torch.Tensor, r_u: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's erase target ε*(∅) − η(ε_r(c) − ε_r(∅)): the unconditional prediction pushed away from the concept."""
    return e_u - eta * (r_c - r_u)


def late_fraction(adapter: FamilyAdapter, tau: float, steps: int) -> float:
    """Fraction of a ``steps``-step sampling schedule that falls in the LATE window (for reports)."""
    sched = adapter.rollout_scheduler(steps)
    times = adapter.model_time(sched.timesteps.float())
    return float(adapter.is_late(times, tau).float().mean()) if len(times) else math.nan
