"""What several commands share: the runtime options, ``--option KEY=VALUE`` parsing, the method list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from ..errors import TraceEraseError

if TYPE_CHECKING:
    from ..runtime import Runtime

# the runtime setting every command that loads a model takes (validated before the model loads)
DeviceOpt = Annotated[str, typer.Option(help="auto (the accelerator when present), cpu, cuda, cuda:N or mps")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on a GPU that has it, else fp16; fp32 on the CPU), fp32, "
                                            "fp16 or bf16")]
OffloadOpt = Annotated[str, typer.Option(help="none, text-encoders (kept in CPU memory) or model (diffusers' model "
                                              "CPU offload while generating); needs an accelerator")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="images per pipeline call (default: what fits a "
                                                                   "24 GB card at the model's resolution)")]
SchedulerOpt = Annotated[str | None, typer.Option(help="sampler: model, ddim, pndm, euler, euler-a, dpm++ (default: "
                                                       "ddim for SD/SDXL, the model's own for FLUX)")]


OverwriteOpt = Annotated[bool, typer.Option(help="replace an existing output folder")]
ResumeOpt = Annotated[bool, typer.Option(help="continue an interrupted run from OUTPUT.partial")]
ScaleConceptOpt = Annotated[list[str] | None, typer.Option(help="NAME=S: concept NAME's adapter at strength S, "
                                                                  "re-fused (a --multi fuse/sum erasure; repeatable)")]


def parse_concept_scales(pairs: list[str] | None) -> dict[str, float]:
    """``--scale-concept NAME=S`` pairs → {name: scale}; one line for a malformed pair."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.rpartition("=")
        try:
            scale = float(value)
        except ValueError:
            scale = float("nan")
        if not sep or not name.strip() or scale != scale or abs(scale) == float("inf"):
            raise TraceEraseError(f"--scale-concept '{pair}' must be NAME=S with a finite number S, e.g. cat=0.5")
        out[name.strip()] = scale
    return out


def runtime_from(device: str, dtype: str, offload: str, batch_size: int | None) -> Runtime:
    """The validated :class:`~trace_erase.runtime.Runtime` of a command's options (one line if one is bad)."""
    from ..runtime import Runtime

    return Runtime(device=device, dtype=dtype, offload=offload, batch_size=batch_size)


def method_list() -> str:
    """The registered methods, for help texts (a method added to the registry shows up without a CLI edit)."""
    from ..methods import METHODS

    return ", ".join(METHODS)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs → {key: YAML value}; a pair without ``=`` or with unparseable YAML is one line."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TraceEraseError(f"--option '{pair}' must be KEY=VALUE, e.g. --option lambda_reg=0.5")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TraceEraseError(f"--option {key.strip()}: {value!r} is not a valid value; quote text or write "
                                  "a number, true/false, null or a [list]") from None
    return out


# evaluation: what to draw (suite, prompts) and who scores it (scorer by path and its settings)
SUITE_HELP = "objects, celebrities, styles, nudity, coco, toy-objects, toy-styles or toy-scenes"
ScorerOpt = Annotated[str | None, typer.Option(help="KIND[:PATH]: toy, clip:CLIP_FOLDER, imagenet:WEIGHTS, nudenet, "
                                                    "face:MODEL.onnx|FOLDER, scene[:FOLDER] (default: the suite's "
                                                    "own, where it has one)")]
PromptsOpt = Annotated[str | None, typer.Option(help="prompt file instead of the suite's built-in prompts: I2P or "
                                                     "MACE-style CSV (type,prompt,evaluation_seed), COCO captions "
                                                     ".json, or a .txt list; one image per row")]
ClassesOpt = Annotated[str | None, typer.Option(help="objects suite class set: cifar10 (default), imagenette, toy, "
                                                     "or a JSON file")]
RetainedOpt = Annotated[str | None, typer.Option(help="celebrities/styles: comma-separated retained names (default: "
                                                      "the suite's list)")]
GalleryOpt = Annotated[str | None, typer.Option(help="face scorer: folder with one subfolder of reference images "
                                                     "per identity")]
ClassMapOpt = Annotated[str | None, typer.Option(help="imagenet scorer: JSON class → ImageNet indices (imagenette "
                                                      "has its own)")]
ArchOpt = Annotated[str | None, typer.Option(help="imagenet scorer: torchvision architecture of a safetensors state "
                                                  "dict (omit for TorchScript)")]
AllowPickleOpt = Annotated[bool, typer.Option(help="allow scorer files that run code when loaded (TorchScript, "
                                                   "pickle .pth); only for files you trust")]
ThresholdOpt = Annotated[float, typer.Option(help="NudeNet detection threshold")]
ReferenceOpt = Annotated[str | None, typer.Option(help="folder of reference images for FID (required by coco)")]


def scorer_options(gallery: str | None, class_map: str | None, arch: str | None, allow_pickle: bool,
                   threshold: float, runtime: Runtime | None = None) -> Any:
    """The :class:`~trace_erase.evaluation.scorers.ScorerOptions` of a command's options (scoring runs on the
    runtime's device)."""
    from ..evaluation.scorers import ScorerOptions

    if not 0.0 < threshold <= 1.0:
        raise TraceEraseError(f"--threshold must be in (0, 1] (got {threshold})")
    device = str(runtime.torch_device) if runtime is not None else "cpu"
    return ScorerOptions(gallery=gallery, class_map=class_map, arch=arch, allow_pickle=allow_pickle,
                         threshold=threshold, device=device)


def name_list(text: str | None) -> list[str] | None:
    """``"a, b"`` → ["a", "b"] (None stays None)."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]
