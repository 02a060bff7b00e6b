"""Loading pipelines (local folder, hub id or a bundled toy name) and picking the family adapter."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceEraseError
from ..runtime import Runtime, as_runtime, place
from .base import FamilyAdapter
from .registry import ADAPTERS, family_of_pipeline_class, supported

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SIDECAR = "trace_erase.json"  # optional sampler defaults stored beside model_index.json

# the embedded toy world's pipelines, shipped inside the package
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "assets"
BUNDLED_MODELS = {"toy-sd": "toy-sd", "toy-flux": "toy-flux"}


@dataclass
class ModelHandle:
    """A loaded pipeline with its adapter, where it came from and its recorded sampler defaults."""

    pipe: Any
    adapter: FamilyAdapter
    source: str
    defaults: dict[str, Any] = field(default_factory=dict)
    runtime: Runtime | None = None  # None: where the pipeline already is (device and dtype of its denoiser)

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = Runtime(device=str(self.adapter.device), dtype=self.adapter.dtype)

    def phase(self, name: str) -> None:
        """Place the components for 'train' or 'generate' (matters only with ``--offload``)."""
        if self.runtime.offload != "none":
            place(self.pipe, self.runtime, name)


def resolve_model(model: str) -> str:
    """A bundled toy name → its folder; a path → checked to exist; anything else is treated as a hub id."""
    if not model or not model.strip():
        raise TraceEraseError("--model is empty; pass a diffusers pipeline folder, a hub id, or toy-sd / toy-flux")
    if model in BUNDLED_MODELS:
        folder = BUNDLED_DIR / BUNDLED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            family = model.removeprefix("toy-").removesuffix("-scenes")
            scenes = " --scenes" if model.endswith("-scenes") else ""
            raise TraceEraseError(
                f"bundled model '{model}' is missing from this install; rebuild it with "
                f"`trace-erase toyworld train --family {family}{scenes} --output {folder}`"
            )
        return str(folder)
    if model.startswith("toy-"):
        raise TraceEraseError(f"unknown toy model '{model}'; available: {', '.join(sorted(BUNDLED_MODELS))}")
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model
    if looks_local:
        if not path.exists():
            raise TraceEraseError(f"model path '{model}' does not exist; pass a diffusers pipeline folder or a hub id")
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise TraceEraseError(
                    f"'{model}' is a single-file pickle checkpoint; convert it to a diffusers folder with "
                    "safetensors (StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR))"
                )
            raise TraceEraseError(
                f"'{model}' is a single file; pass a diffusers pipeline folder (the one save_pretrained writes)"
            )
        if not (path / "model_index.json").is_file():
            raise TraceEraseError(
                f"'{model}' is not a diffusers pipeline folder (no model_index.json); "
                "point --model at the folder save_pretrained wrote"
            )
        return str(path)
    return model


def pickle_only_components(folder: Path) -> list[str]:
    """Component weight files that exist only as pickle (no safetensors beside them)."""
    index = json.loads((folder / "model_index.json").read_text())
    bad = []
    for name, spec in index.items():
        sub = folder / name
        if name.startswith("_") or not isinstance(spec, list) or not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        has_safe = any(p.suffix == ".safetensors" for p in files)
        pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles and not has_safe:
            bad.append(f"{name}/{pickles[0].name}")
    return bad


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component / per-shard loading bars from diffusers and transformers (they would precede any later
    one-line error); their state is restored after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def null_components(location: str | Path) -> dict[str, None]:
    """Components a saved folder lists as absent (``[null, null]``, e.g. SD3 saved without T5), to pass as None:
    diffusers' ``from_pretrained`` refuses such a folder otherwise."""
    try:
        index = json.loads((Path(location) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]
            and name not in ("safety_checker", "feature_extractor", "image_encoder")}


def load_pipeline(
    model: str, *, allow_pickle: bool = False, runtime: Runtime | None = None,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
) -> Any:
    """Load a diffusers pipeline from a local folder, a hub id or a bundled toy name, refusing pickle weights, and
    place it as ``runtime`` (or ``device``/``dtype``) says; the default is the accelerator when present.

    Pickle weights (``.bin``/``.ckpt``) can run code when loaded, so they are refused unless ``allow_pickle``.
    """
    from diffusers import DiffusionPipeline

    runtime = as_runtime(runtime, device=device, dtype=dtype)
    location = resolve_model(model)
    kwargs: dict[str, Any] = {"dtype": runtime.torch_dtype}
    local = Path(location).is_dir()
    if local:
        bad = pickle_only_components(Path(location))
        if bad and not allow_pickle:
            raise TraceEraseError(
                f"'{model}' stores weights only as pickle ({', '.join(bad)}); convert them to safetensors "
                "or pass --allow-pickle if you trust the file"
            )
        index = json.loads((Path(location) / "model_index.json").read_text())
        if index.get("safety_checker", [None])[0] is not None:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        kwargs.update(null_components(location))
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise TraceEraseError(f"could not load the pipeline in '{model}': {first}") from exc
        raise TraceEraseError(
            f"could not load '{model}': not a local folder and not reachable on the Hugging Face Hub "
            f"({type(exc).__name__}); download it first or pass a local pipeline folder"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    place(pipe, runtime, "train")
    return pipe


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_dtypes(model: str) -> dict[str, torch.dtype]:
    """Per component, the floating dtype its safetensors weights are stored in (what ``merge`` writes back), for a
    local folder or a hub id already in the local cache; components it cannot tell are left out."""
    from safetensors import safe_open

    location = Path(resolve_model(model))
    if not location.is_dir():
        try:
            from diffusers import DiffusionPipeline

            location = Path(DiffusionPipeline.download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the loaded dtype is kept
            return {}
    out: dict[str, torch.dtype] = {}
    for sub in sorted(p for p in location.iterdir() if p.is_dir()):
        for file in sorted(sub.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    kind = f.get_slice(key).get_dtype()
                    if kind in SAFETENSORS_DTYPES:
                        out[sub.name] = SAFETENSORS_DTYPES[kind]
                        break
            if sub.name in out:
                break
    return out


def peek_family(model: str) -> str | None:
    """The family of a local pipeline folder from its ``model_index.json`` alone (to validate options before the
    load); None when it cannot tell without loading."""
    try:
        location = Path(resolve_model(model))
        index = json.loads((location / "model_index.json").read_text())
    except (TraceEraseError, OSError, ValueError):
        return None
    return family_of_pipeline_class(str(index.get("_class_name")))


def sidecar_defaults(location: str) -> dict[str, Any]:
    """Sampler defaults recorded beside a pipeline folder (``trace_erase.json``), if any."""
    path = Path(location) / SIDECAR
    if path.is_file():
        return json.loads(path.read_text()).get("sampler", {})
    return {}


def get_adapter(pipe: Any, defaults: dict[str, Any] | None = None) -> FamilyAdapter:
    """The family adapter for a loaded pipeline; unsupported architectures get an error listing what works."""
    defaults = defaults or {}
    components = getattr(pipe, "components", {})
    for cls in ADAPTERS:
        if cls.matches(components):
            return cls.create(pipe, defaults)
    denoiser = components.get("transformer") or components.get("unet")
    kind = type(denoiser).__name__ if denoiser is not None else "no denoiser"
    raise TraceEraseError(f"unsupported architecture: {type(pipe).__name__} with {kind}; supported: {supported()}")


def load_model(
    model: str, *, allow_pickle: bool = False, runtime: Runtime | None = None,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    offload: str | None = None, batch_size: int | None = None,
) -> ModelHandle:
    """Load a pipeline and its adapter in one call (what the CLI and the high-level API use).

    ``runtime`` (or the loose ``device/dtype/offload/batch_size``) says where it runs: by default on the accelerator
    when there is one, in bf16 there (fp16 where bf16 is not supported), in fp32 on the CPU."""
    runtime = as_runtime(runtime, device=device, dtype=dtype, offload=offload, batch_size=batch_size)
    pipe = load_pipeline(model, allow_pickle=allow_pickle, runtime=runtime)
    location = resolve_model(model)
    defaults = sidecar_defaults(location) if Path(location).is_dir() else {}
    adapter = get_adapter(pipe, defaults)
    adapter.execution_device = runtime.torch_device
    return ModelHandle(pipe=pipe, adapter=adapter, source=model, defaults=defaults, runtime=runtime)


def pipe_and_adapter(target: Any) -> tuple[Any, FamilyAdapter]:
    """(pipeline, its family adapter) of a pipeline or a :class:`ModelHandle`."""
    if isinstance(target, ModelHandle):
        return target.pipe, target.adapter
    return target, get_adapter(target)
