"""Training the toy pipelines (``toy-sd``: latent diffusion, ``toy-flux``: rectified flow) from rendered images.

One run: render a dataset → train a small AutoencoderKL → encode latents → train the denoiser together with the
text encoder(s) (a toy model binds colour/shape words far better with its text encoder trained jointly) → save a
real diffusers pipeline folder. The scene world (``world='scenes'``: 64×32 two-slot pictures, toy-sd-scenes and
toy-flux-scenes) runs the same way, fine-tuned from a single-object pipeline (``init_from``, ``vae_from``).
Checkpoints go to ``OUTPUT.partial/``; rerunning the same command resumes there.
The recipe is in :mod:`.config`, the components in :mod:`.components`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts.checkpoint import load_checkpoint, save_checkpoint
from ..errors import NonFiniteLossError, TraceEraseError
from ..io import atomic_write
from .components import assemble_pipeline, build_components, trained_components
from .config import SCENE_FIRST_SEED, SCENE_HELDOUT_PAIRS, ToyTrainConfig, check_recipe
from .data import render_set, to_tensor
from .render import caption_for
from .scenes.captions import caption_for as scene_caption_for
from .scenes.data import render_scenes, scene_from_labels


def scene_caption(labels: dict, seed: int) -> str:
    """A random caption form of the scene ``labels`` (:func:`.data.scene_labels`), drawn from ``seed``."""
    return scene_caption_for(scene_from_labels(labels), seed)


def shift_noise_levels(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels ``u`` in [0, 1] (0 clean, 1 pure noise) moved towards noise by ``shift`` (SD3's time shift,
    s·u / (1 + (s − 1)·u)); ``shift`` 1 returns them unchanged, and the map is monotone, so their order is kept."""
    return u if shift == 1 else shift * u / (1 + (shift - 1) * u)


# ---- training ----------------------------------------------------------------------------------------------------
class ToyTrainer:
    """Runs (or resumes) one toy training; all state lives in ``OUTPUT.partial``."""

    def __init__(self, cfg: ToyTrainConfig, output: str | Path, overwrite: bool = False, progress: bool = True,
                 start_from: str | Path | None = None):
        if cfg.cycles < 1 or cfg.steps % cfg.cycles:
            raise TraceEraseError(f"steps ({cfg.steps}) must be a multiple of cycles ({cfg.cycles})")
        if cfg.snr_gamma is not None and (cfg.family != "sd" or cfg.snr_gamma <= 0):
            raise TraceEraseError("snr_gamma weights toy-sd's ε-prediction loss and must be > 0 (e.g. 5); "
                                  "drop it for --family flux")
        check_recipe(cfg)
        self.cfg = cfg
        self.start_from = start_from
        self.output = Path(output)
        self.partial = self.output.parent / (self.output.name + ".partial")
        self.progress = progress
        if self.output.exists() and not overwrite:
            raise TraceEraseError(f"output folder '{self.output}' already exists; pass --overwrite to replace it")
        if overwrite and self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        key_file = self.partial / "config.json"
        if key_file.exists() and json.loads(key_file.read_text()).get("key") != cfg.key():
            raise TraceEraseError(
                f"'{self.partial}' holds a run with other settings; pass --overwrite to start afresh"
            )
        key_file.write_text(json.dumps({"key": cfg.key(), "config": dataclasses.asdict(cfg)}, indent=2))
        self.ckpt_path = self.partial / "checkpoint.pt"
        self.timing_path = self.partial / "timing.json"  # seconds per phase; a resumed run adds to them
        self.timing: dict[str, float] = json.loads(self.timing_path.read_text()) if self.timing_path.exists() else {}
        self._mark = time.monotonic()

    # data
    def dataset(self) -> tuple[np.ndarray, list[dict]]:
        path = self.partial / "dataset.npz"
        if path.exists():
            data = np.load(path)
            return data["images"], json.loads(str(data["labels"]))
        self._mark = time.monotonic()
        if self.cfg.world == "scenes":  # the check's class pairs never appear together
            ds = render_scenes(SCENE_FIRST_SEED + self.cfg.seed * 10_000_000, self.cfg.n_images,
                               skip_pairs=SCENE_HELDOUT_PAIRS, progress=self.progress)
        else:
            ds = render_set(self.cfg.seed * 10_000_000, self.cfg.n_images, self.cfg.image_size, self.progress)
        tmp = self.partial / "dataset.tmp.npz"
        np.savez(tmp, images=ds.images, labels=json.dumps(ds.labels))
        tmp.rename(path)
        self._clock("render")
        return ds.images, ds.labels

    def _clock(self, phase: str) -> None:
        """Add the seconds since the last mark to ``phase``; the sidecar reports them, so the training time of a
        recipe is measured by the command that trains it."""
        now = time.monotonic()
        self.timing[phase] = self.timing.get(phase, 0.0) + now - self._mark
        self._mark = now
        atomic_write(self.timing_path, json.dumps(self.timing))

    def _save(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.ckpt_path, state)  # atomic and checksummed: a kill mid-write keeps the previous one

    def _load(self) -> dict[str, Any] | None:
        if self.ckpt_path.exists():
            state = load_checkpoint(self.ckpt_path)
            if self.start_from is not None and self.progress:  # rerunning the same command resumes, not restarts
                tqdm.write(f"resuming '{self.partial}' at {state['phase']} step {state['step']}; --start-from is "
                           "only read by a fresh run (--overwrite starts afresh)")
            return state
        if self.start_from is not None:
            state = self._state_from_pipeline(self.start_from)
            self._save(state)
            return state
        return None

    def _state_from_pipeline(self, source: str | Path) -> dict[str, Any]:
        """The state at a cycle boundary, taken from a finished toy pipeline trained with the first k cycles of
        this very configuration (a boundary depends only on the EMA weights, which that pipeline holds)."""
        from ..models.loading import SIDECAR, resolve_model

        folder = Path(resolve_model(str(source)))
        sidecar = folder / SIDECAR
        if not sidecar.is_file():
            raise TraceEraseError(f"'{folder}' has no {SIDECAR}; --start-from takes a pipeline made by "
                                  "`trace-erase toyworld train`")
        done = json.loads(sidecar.read_text())["training"]
        done.setdefault("cycles", 1)
        ignore = ("steps", "cycles", "sampler_steps", "sampler_guidance", "checkpoint_every")
        ours = dataclasses.asdict(self.cfg)
        older = json.loads(json.dumps(dataclasses.asdict(ToyTrainConfig())))  # fields added since: their default
        diff = sorted(k for k in ours if k not in ignore
                      and json.loads(json.dumps(ours[k])) != done.get(k, older[k]))
        k = done["cycles"]
        if diff or done["steps"] != k * self.cfg.cycle_steps or k >= self.cfg.cycles:
            raise TraceEraseError(
                f"'{folder}' was not trained with the first cycles of this configuration (differs in "
                f"{', '.join(diff) or 'steps/cycles'}); start without --start-from"
            )
        from diffusers import DiffusionPipeline

        names = trained_components(self.cfg.family)
        pipe = DiffusionPipeline.from_pretrained(folder)  # the classes' own loading restores tied weights (T5)
        models = {n: getattr(pipe, n).state_dict() for n in names}
        return {"phase": "denoiser", "step": done["steps"], "vae": pipe.vae.state_dict(), "models": models,
                "ema": copy.deepcopy(models), "started_from": str(folder)}

    def run(self, stop_after: int | None = None) -> Path | None:
        """Train to the end (or until ``stop_after`` optimizer steps in this call, for tests); returns the folder."""
        cfg = self.cfg
        images, labels = self.dataset()
        x = to_tensor(images)
        parts = build_components(cfg)
        state = self._load()
        done_steps = 0
        vae = parts["vae"]
        if cfg.vae_from is not None and (state is None or state["phase"] == "vae"):
            vae = parts["vae"] = self._shared_vae(cfg.vae_from)
            state = None
        elif state is None or state["phase"] == "vae":
            vae_step = 0
            opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.vae_steps)
                                                                             / max(cfg.vae_steps, 1)))
            )
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            if state is not None:
                vae.load_state_dict(state["vae"])
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
                gen.set_state(state["gen"])
                vae_step = state["step"]
            bar = tqdm(total=cfg.vae_steps, initial=vae_step, desc="training VAE", disable=not self.progress)
            vae.train()
            self._mark = time.monotonic()
            while vae_step < cfg.vae_steps:
                idx = torch.randint(0, len(x), (cfg.vae_batch,), generator=gen)
                batch = x[idx]
                post = vae.encode(batch).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
                rec = vae.decode(z).sample
                loss = (rec - batch).abs().mean() + (rec - batch).pow(2).mean() + 1e-6 * post.kl().mean()
                self._check(loss, vae_step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                vae_step += 1
                done_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if vae_step % cfg.checkpoint_every == 0 or vae_step == cfg.vae_steps:
                    self._clock("vae")
                    self._save({"phase": "vae", "step": vae_step, "vae": vae.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "gen": gen.get_state()})
                if stop_after is not None and done_steps >= stop_after:
                    bar.close()
                    return None
            bar.close()
            state = None
        else:
            vae.load_state_dict(state["vae"])
        vae.eval()
        self._mark = time.monotonic()
        latents = self._latents(vae, x)
        self._clock("latents")
        mean, std = float(latents.mean()), float(latents.std())
        return self._train_denoiser(parts, latents, labels, (mean, std), state, stop_after, done_steps)

    @staticmethod
    def _shared_vae(source: str) -> nn.Module:
        from diffusers import AutoencoderKL

        from ..models.loading import resolve_model

        folder = Path(resolve_model(source)) / "vae"
        if not folder.is_dir():
            raise TraceEraseError(f"no VAE at '{folder}'; train toy-sd first: trace-erase toyworld train --family sd")
        vae = AutoencoderKL.from_pretrained(folder)
        vae.register_to_config(scaling_factor=1.0, shift_factor=None)
        return vae

    def _latents(self, vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])

    @staticmethod
    def _check(loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at step {step}; the last checkpoint is kept — "
                                     "lower the learning rate and rerun to resume")

    def _train_denoiser(self, parts: dict[str, Any], latents: torch.Tensor, labels: list[dict],
                        stats: tuple[float, float], state: dict[str, Any] | None, stop_after: int | None,
                        done_steps: int) -> Path | None:
        cfg = self.cfg
        flux = cfg.family == "flux"
        mean, std = stats
        trainable = {name: parts[name] for name in trained_components(cfg.family)}
        params = [p for m in trainable.values() for p in m.parameters()]
        length = cfg.cycle_steps
        warmup = max(1, min(200, length // 10))

        def new_cycle(cycle: int) -> tuple[torch.optim.Optimizer, Any, torch.Generator]:
            """Optimizer, warmup+cosine schedule and data generator of one cycle (cycle 0: the plain run)."""
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, length) / length))
            )
            return opt, sched, torch.Generator().manual_seed(cfg.seed + 2 + 1000 * cycle)

        ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in trainable.items()}
        opt, sched, gen = new_cycle(0)
        step = 0
        if state is not None:
            for k, m in trainable.items():
                m.load_state_dict(state["models"][k])
                ema[k].load_state_dict(state["ema"][k])
            step = state["step"]
            if "opt" in state:  # absent at a cycle boundary (--start-from): the loop starts the cycle afresh
                opt, sched, gen = new_cycle(step // length)
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
                gen.set_state(state["gen"])
        pipe = assemble_pipeline(cfg, parts, stats)
        if not flux:
            alphas = pipe.scheduler.alphas_cumprod
        for m in trainable.values():
            m.train()
        caption = scene_caption if cfg.world == "scenes" else caption_for
        bar = tqdm(total=cfg.steps, initial=step, desc=f"training {cfg.name}", disable=not self.progress)
        self._mark = time.monotonic()
        while step < cfg.steps:
            if step and step % length == 0:  # visited once per boundary, also when a run resumes exactly here
                # warm restart: continue from the EMA weights, fresh optimizer, schedule and data order
                for k, m in trainable.items():
                    m.load_state_dict(ema[k].state_dict())
                opt, sched, gen = new_cycle(step // length)
            idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
            drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
            captions = ["" if d else caption(labels[i], seed=step * cfg.batch + j + 7)
                        for j, (i, d) in enumerate(zip(idx.tolist(), drop.tolist(), strict=True))]
            noise = torch.randn(latents[idx].shape, generator=gen)
            if flux:
                z0 = (latents[idx] - mean) / std
                sigma = shift_noise_levels(torch.sigmoid(torch.randn(cfg.batch, generator=gen)), cfg.noise_shift)
                zt = (1 - sigma[:, None, None, None]) * z0 + sigma[:, None, None, None] * noise
                target = noise - z0
                pred = self._flux_forward(pipe, zt, sigma, captions)
            else:
                z0 = latents[idx] / std
                if cfg.noise_shift == 1:  # the plain draw (older runs resume with the same generator stream)
                    t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
                else:
                    u = shift_noise_levels(torch.rand(cfg.batch, generator=gen), cfg.noise_shift)
                    t = (u * 1000).long().clamp(max=999)
                a = alphas[t].sqrt()[:, None, None, None]
                s = (1 - alphas[t]).sqrt()[:, None, None, None]
                zt = a * z0 + s * noise
                ids = pipe.tokenizer(captions, padding="max_length", max_length=cfg.max_tokens, truncation=True,
                                     return_tensors="pt").input_ids
                cond = pipe.text_encoder(ids)[0]
                pred = pipe.unet(zt, t, encoder_hidden_states=cond).sample
                target = noise if cfg.noise_schedule == "epsilon" else a * noise - s * z0  # v = √ᾱ·ε − √(1−ᾱ)·x0
            if flux or cfg.snr_gamma is None:
                loss = nn.functional.mse_loss(pred, target)
            else:  # min-SNR-γ: low-noise steps, which dominate the ε-loss's gradient, count no more than SNR γ
                snr = alphas[t] / (1 - alphas[t])
                weight = snr.clamp(max=cfg.snr_gamma) / snr
                loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
            self._check(loss, step)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for k, m in trainable.items():
                    for pe, pm in zip(ema[k].parameters(), m.parameters(), strict=True):
                        pe.lerp_(pm, 1 - cfg.ema_decay)
            step += 1
            done_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self._clock("denoiser")
                self._save({
                    "phase": "denoiser", "step": step, "vae": parts["vae"].state_dict(),
                    "models": {k: m.state_dict() for k, m in trainable.items()},
                    "ema": {k: m.state_dict() for k, m in ema.items()},
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                })
            if stop_after is not None and done_steps >= stop_after and step < cfg.steps:
                bar.close()
                return None
        bar.close()
        for k, m in ema.items():
            trainable[k].load_state_dict(m.state_dict())
        return self._finish(assemble_pipeline(cfg, parts, stats))

    @staticmethod
    def _flux_forward(pipe: Any, zt: torch.Tensor, sigma: torch.Tensor, captions: list[str]) -> torch.Tensor:
        from ..models.base import Conditioning
        from ..models.flux import FluxAdapter

        scale = pipe.vae_scale_factor
        adapter = FluxAdapter(pipe, height=zt.shape[-2] * scale, width=zt.shape[-1] * scale)
        tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        pooled = pipe.text_encoder(tok).pooler_output
        tok2 = pipe.tokenizer_2(captions, padding="max_length", max_length=adapter.max_tokens, truncation=True,
                                return_tensors="pt").input_ids
        ctx = pipe.text_encoder_2(tok2)[0]
        cond = Conditioning({"encoder_hidden_states": ctx, "pooled_projections": pooled})
        return adapter.predict(zt, sigma, cond)

    def _finish(self, pipe: Any) -> Path:
        from ..io import output_folder
        from ..models.loading import SIDECAR

        for m in pipe.components.values():
            if isinstance(m, nn.Module):
                m.eval()
        final = Path(self.output)
        with output_folder(self.output, overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            height, width = self.cfg.height_width
            size = {"resolution": height} if height == width else {"height": height, "width": width}
            sidecar = {
                "sampler": {"steps": self.cfg.sampler_steps, "guidance": self.cfg.sampler_guidance, **size},
                "training": dataclasses.asdict(self.cfg),
                "training_seconds": {  # steps lost to an interruption are not counted; --start-from cycles neither
                    **{k: round(v, 1) for k, v in self.timing.items()}, "total": round(sum(self.timing.values()), 1),
                    "threads": torch.get_num_threads(), "start_from": None if self.start_from is None
                    else str(self.start_from),
                },
                "note": "trace-erase toy world model; trained by `trace-erase toyworld train`",
            }
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        shutil.rmtree(self.partial, ignore_errors=True)
        return final
