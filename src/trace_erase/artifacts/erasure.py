"""The :class:`Erasure` artifact: what an erasure method returns, saves, loads and applies to a pipeline.

On disk an erasure is a folder with ``pytorch_lora_weights.safetensors`` (standard diffusers/peft LoRA keys, so a
plain ``pipe.load_lora_weights(folder)`` works) and ``erasure.json`` (method, config, concepts, base-model identity,
versions, timings, certificate). Folders are written to a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceEraseError
from ..io import file_sha256, output_folder
from ..models.loading import pipe_and_adapter
from ..models.text_lora import split_qualified
from .fingerprint import check_fingerprint, fingerprint
from .gate import LateGate
from .manifest import Manifest, check_file_name

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
GATED_WEIGHT_NAME = "gated_lora_weights.safetensors"
MANIFEST_NAME = "erasure.json"


@dataclass
class Applied:
    """What :meth:`Erasure.apply` loaded: adapter names, their weights and, for a gated erasure, the gate installed on
    the denoiser (a forward pre-hook, so the pipeline's own ``__call__`` honours it)."""

    adapter_name: str | None
    gated_adapter_name: str | None = None
    gate: LateGate | None = None
    scale: float = 1.0

    @property
    def names(self) -> list[str]:
        return [n for n in (self.adapter_name, self.gated_adapter_name) if n is not None]


APPLIED_ATTR = "_trace_erase_applied"  # erasures applied to a pipeline, in order (set on the pipeline object)


def applied_erasures(target: Any) -> list[Applied]:
    """The erasures :meth:`Erasure.apply` has loaded into ``target`` and not removed."""
    pipe, _ = pipe_and_adapter(target)
    return list(getattr(pipe, APPLIED_ATTR, []))


def remove_erasures(target: Any) -> None:
    """Unload every erasure applied to ``target`` (adapters and gates); other adapters stay as they are."""
    pipe, _ = pipe_and_adapter(target)
    applied_list = getattr(pipe, APPLIED_ATTR, [])
    for applied in applied_list:
        if applied.gate is not None:
            applied.gate.remove()
        if applied.names:
            pipe.delete_adapters(applied.names)
    if applied_list and not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()  # no adapter left: take off peft's now-empty wrappers too (plain Linear again)
    setattr(pipe, APPLIED_ATTR, [])


class Erasure:
    """An erasure: LoRA tensors in diffusers format (plus an optional gated part) and its manifest."""

    def __init__(self, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any],
                 gated_state_dict: dict[str, torch.Tensor] | None = None,
                 fusion_state: dict[str, torch.Tensor] | None = None):
        self.state_dict = state_dict
        self.gated_state_dict = gated_state_dict
        self.manifest = manifest
        # --multi fuse/sum: each concept's stage-B factors and token Grams, for per-concept scales at apply time
        self.fusion_state = fusion_state

    # ---- views --------------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def prefix(self) -> str:
        return self.manifest["lora"]["prefix"]

    @property
    def certificate(self) -> dict[str, Any]:
        return self.manifest.get("certificate", {})

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["lora"]["target_modules"])

    def components(self, denoiser_name: str) -> list[str]:
        """The pipeline components this erasure's LoRA edits: the denoiser and/or text encoders."""
        heads = [split_qualified(m)[0] or denoiser_name for m in self.modules]
        return list(dict.fromkeys(heads))

    def deltas(self) -> dict[str, torch.Tensor]:
        """ΔW per module at scale 1 (B·A)."""
        from .lora import lora_to_delta

        return lora_to_delta(self.state_dict, self.prefix)

    # ---- files --------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = False,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write the folder atomically: nothing is left behind if writing fails half-way. ``extra(folder)`` writes
        more files into the folder before it is committed (exports); their hashes join the integrity record."""
        from safetensors.torch import save_file

        with output_folder(directory, overwrite, "erasure output") as tmp:
            if self.state_dict:
                save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(tmp / LORA_WEIGHT_NAME),
                          metadata={"format": "pt"})
            if self.gated_state_dict is not None:
                save_file({k: v.contiguous() for k, v in self.gated_state_dict.items()},
                          str(tmp / GATED_WEIGHT_NAME), metadata={"format": "pt"})
            if self.fusion_state:
                save_file({k: v.contiguous() for k, v in self.fusion_state.items()},
                          str(tmp / self.manifest["fusion"]["weight_name"]), metadata={"format": "pt"})
            if extra is not None:
                extra(tmp)
            files = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
            manifest = {k: v for k, v in self.manifest.items() if k != "integrity"}
            manifest["integrity"] = {"files": files, "manifest": manifest_sha256(manifest)}
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        return Path(directory)

    # ---- use --------------------------------------------------------------------------------------------------------
    def check_base(self, target: Any) -> None:
        """Refuse a pipeline whose edited weights differ from the base this erasure was made for."""
        _, adapter = pipe_and_adapter(target)
        base = self.manifest["base_model"]
        if adapter.family != base["family"]:
            raise TraceEraseError(
                f"this erasure is for a {base['family']} model ('{base['source']}'), not {adapter.family}; "
                "apply it to its base model"
            )
        try:
            actual = fingerprint(adapter, self.modules)
        except AttributeError as exc:
            raise TraceEraseError(
                f"this erasure edits layers the model does not have (made for '{base['source']}'); "
                "apply it to its base model"
            ) from exc
        check_fingerprint(base["fingerprint"], actual, base["source"])

    def _load_adapter(self, pipe: Any, state: dict[str, torch.Tensor], name: str) -> str:
        from diffusers.utils import logging as dlogging

        existing = {n for names in pipe.get_list_adapters().values() for n in names}
        base, i = name, 1
        while name in existing:
            name, i = f"{base}_{i}", i + 1
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # silence "no LoRA keys for text_encoder" (or for the unet: AdvUnlearn's)
        try:
            pipe.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name=name)
        finally:
            dlogging.set_verbosity(verbosity)
        return name

    def apply(self, target: Any, scale: float = 1.0, adapter_name: str = "trace_erase", check: bool = True,
              combine: bool = False) -> Applied:
        """Load the LoRA(s) into ``target`` (a pipeline or ModelHandle) at strength ``scale``.

        Applying replaces any erasure applied before (``combine=True`` stacks them instead). The base weights stay
        untouched: the edit lives in peft adapters that can be scaled, disabled or unloaded. A gated erasure's
        LATE-only part is switched by a hook on the denoiser, so ``pipe(prompt)`` honours it as is.
        """
        pipe, adapter = pipe_and_adapter(target)
        if check:
            self.check_base(target)
        if not combine:
            remove_erasures(pipe)
        previous = applied_erasures(pipe)
        main = self._load_adapter(pipe, self.state_dict, adapter_name) if self.state_dict else None
        gated = None
        if self.gated_state_dict is not None:
            gated = self._load_adapter(pipe, self.gated_state_dict, adapter_name + "_gated")
        applied = Applied(main, gated, scale=scale)
        ours = {n: a.scale for a in [*previous, applied] for n in a.names}  # erasure adapters and their weights
        others = [n for n in (pipe.get_active_adapters() if pipe.get_list_adapters() else []) if n not in ours]
        pipe.set_adapters([*others, *ours], adapter_weights=[1.0] * len(others) + list(ours.values()))
        if gated is not None:
            applied.gate = LateGate(adapter, gated, scale, float(self.manifest["gate"]["tau"]))
        setattr(pipe, APPLIED_ATTR, [*previous, applied])
        return applied

    def merge_into(self, target: Any, scale: float = 1.0) -> Any:
        """Fuse the erasure into the pipeline's weights (for ``trace-erase merge``); returns the pipeline."""
        pipe, adapter = pipe_and_adapter(target)
        if self.gated_state_dict is not None:
            raise TraceEraseError("a gated erasure acts only in late steps and cannot be fused into the weights; "
                                  "use `generate --erasure` instead of merge")
        self.apply(target, scale=scale)
        pipe.fuse_lora(components=self.components(adapter.denoiser_name), lora_scale=1.0)
        pipe.unload_lora_weights()
        setattr(pipe, APPLIED_ATTR, [])
        return pipe


def load_erasure(directory: str | Path, allow_pickle: bool = False) -> Erasure:
    """Read an erasure folder written by :meth:`Erasure.save`, with one-line errors for bad folders/files: the
    manifest is validated against its versioned schema (:class:`Manifest`) before any weight file is opened."""
    d = Path(directory)
    if not d.is_dir():
        raise TraceEraseError(f"erasure folder '{directory}' does not exist; pass the --output of `trace-erase erase`")
    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        raise TraceEraseError(f"'{directory}' is not an erasure folder (no {MANIFEST_NAME}); pass an erase output")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceEraseError(f"'{mpath}' is corrupt ({getattr(exc, 'msg', type(exc).__name__)}); "
                              "re-run the erasure") from exc
    typed = Manifest.parse(manifest, str(mpath))
    check_integrity(d, manifest, str(mpath))
    wpath = d / typed.lora.weight_name
    gated = _read_safetensors(d / typed.gate.weight_name) if typed.gate else None
    fusion = manifest.get("fusion")
    fusion_state = None
    if isinstance(fusion, dict) and isinstance(fusion.get("weight_name"), str):
        fusion_state = _read_safetensors(d / check_file_name(fusion["weight_name"], str(mpath), "fusion.weight_name"))
    if not wpath.is_file() and typed.gate and typed.lora.rank == 0:
        return Erasure({}, manifest, gated_state_dict=gated, fusion_state=fusion_state)
    if not wpath.is_file():
        pickles = sorted(d.glob("*.bin"))
        if pickles and allow_pickle:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
            return Erasure(state, manifest, gated_state_dict=gated)
        if pickles:
            raise TraceEraseError(
                f"'{directory}' holds its LoRA only as pickle ({pickles[0].name}); convert it to safetensors "
                "or pass --allow-pickle if you trust it"
            )
        raise TraceEraseError(f"'{directory}' has no {typed.lora.weight_name}; re-run the erasure")
    state = _read_safetensors(wpath)
    prefix = typed.lora.prefix + "."
    if not state or any(not k.startswith(prefix) and split_qualified(k)[0] is None for k in state):
        raise TraceEraseError(f"'{wpath}' does not hold this erasure's LoRA (keys must start with '{prefix}' or a "
                              "text encoder's name); re-run the erasure")
    return Erasure(state, manifest, gated_state_dict=gated, fusion_state=fusion_state)


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Hash of the manifest's content without its ``integrity`` field (canonical JSON)."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_integrity(folder: Path, manifest: dict[str, Any], where: str) -> None:
    """Refuse an erasure whose manifest or weight files changed after it was written (a flipped byte, a truncated
    copy, an edited field). Folders from before the integrity record (format 1) are not checked."""
    record = manifest.get("integrity")
    if record is None and manifest.get("format_version", 1) < 2:
        return
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise TraceEraseError(f"'{where}' has no valid integrity record; re-run the erasure")
    if record.get("manifest") != manifest_sha256(manifest):
        raise TraceEraseError(f"'{where}' was modified after it was written (its content hash does not match); "
                              "re-run the erasure")
    for name, expected in record["files"].items():
        path = folder / str(name)
        if Path(str(name)).name != name:
            raise TraceEraseError(f"'{where}' lists a file outside its folder ({name!r}); re-run the erasure")
        if not path.is_file():
            continue  # a missing weight file is reported by the loader (which also knows about pickle copies)
        if file_sha256(path) != expected:
            raise TraceEraseError(f"'{path}' is corrupt (its sha256 does not match erasure.json); re-run the erasure")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise TraceEraseError(f"'{path}' is missing; re-run the erasure")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TraceEraseError(f"'{path}' is corrupt or truncated ({type(exc).__name__}); re-run the erasure") from exc
