"""``--target``: the file format and module placement for the tool a user names, decided from :mod:`.readers`.

A target lists the readers it must satisfy and the format it writes per family. For every module of the erasure the
exporter then chooses, in this order: (1) its place in that format, when every reader of the target loads it there —
adding zero-valued placeholder modules where a reader only recognises a file that holds them (InvokeAI's diffusers
FLUX detection; complete fused q/k/v groups), which change nothing; (2) otherwise a companion file of edited weights
for just those modules, beside the LoRA, with loading instructions printed and recorded; (3) with ``strict``, a
refusal naming the module and the reader, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import TraceEraseError
from .readers import READERS, Reader, judge


@dataclass(frozen=True)
class Target:
    """A tool users name: the readers an export for it must satisfy, and the file format per family."""

    name: str
    readers: tuple[str, ...]
    formats: dict[str, str]
    unsupported: str = ""  # what to use instead, for a family without a format

    def format_for(self, family: str) -> str:
        if family not in self.formats:
            raise TraceEraseError(f"--target {self.name} has no LoRA loader for {family} models; "
                                  f"{self.unsupported or 'use --target comfyui or diffusers'}")
        return self.formats[family]

    def readers_for(self, family: str) -> list[Reader]:
        fmt = self.format_for(family)
        return [READERS[r] for r in self.readers if (family, fmt) in READERS[r].rules]


_KOHYA_ALL = {"sd": "kohya", "sdxl": "kohya", "flux": "kohya", "sd3": "kohya"}
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("comfyui", ("comfyui",), _KOHYA_ALL),
    Target("a1111", ("a1111",), {"sd": "kohya", "sdxl": "kohya"},
           "A1111 has no FLUX loader and maps only SD3's joint-block attention; use --target forge or comfyui"),
    Target("forge", ("forge",), {"sd": "kohya", "sdxl": "kohya", "flux": "kohya"},
           "Forge runs no SD3; use --target comfyui or diffusers"),
    Target("invokeai", ("invokeai",), {"sd": "kohya", "sdxl": "kohya", "flux": "diffusers"},
           "InvokeAI has no SD3 LoRA loader; use --target comfyui or diffusers"),
    Target("kohya", ("sd-scripts", "sd-scripts-diffusers"), _KOHYA_ALL),
    Target("diffusers", ("diffusers",), {"sd": "diffusers", "sdxl": "diffusers", "flux": "diffusers",
                                         "sd3": "diffusers"}),
)}


def check_target(name: str | None) -> None:
    if name is not None and name not in TARGETS:
        raise TraceEraseError(f"unknown --target '{name}'; choose one of {', '.join(TARGETS)}")


@dataclass
class Placement:
    """Where a target's export puts each module: ``companion`` maps denoiser modules that no LoRA of the format can
    carry for some reader to those readers' names; ``placeholders`` are zero modules the readers need to see."""

    format: str
    readers: list[Reader]
    companion: dict[str, list[str]] = field(default_factory=dict)
    placeholders: list[str] = field(default_factory=list)


def place(target: Target, family: str, names: dict[str, tuple[str, ...]], strict: bool,
          to_module: Callable[[str], str | None]) -> Placement:
    """Decide the placement for ``names`` (module name in the file → the denoiser modules it carries).
    ``to_module(name)`` gives the denoiser module of a file module name for placeholders (diffusers format), or
    None when a placeholder cannot be written. Raises, under ``strict``, on the first module a reader cannot load."""
    fmt = target.format_for(family)
    placement = Placement(fmt, target.readers_for(family))
    for reader in placement.readers:
        rule = reader.rules[(family, fmt)]
        for name, members in names.items():
            if rule.loads_module(name):
                continue
            if strict:
                raise TraceEraseError(f"--strict: {reader.name} {reader.version} cannot load '{members[0]}' (as "
                                      f"'{name}'); drop --strict to write it to a companion file, or pick another "
                                      "--target")
            for m in members:
                placement.companion.setdefault(m, []).append(reader.name)
        kept = [n for n, members in names.items() if not any(m in placement.companion for m in members)]
        for extra in rule.missing(kept):
            module = to_module(extra)
            if module is None or not rule.loads_module(extra):
                raise TraceEraseError(f"{reader.name} needs '{extra}' in the file, which this export cannot add; "
                                      "pick another --target")
            if module not in placement.placeholders:
                placement.placeholders.append(module)
    return placement


def verdicts(family: str, fmt: str, names: list[str]) -> list[dict[str, object]]:
    """Every known reader's verdict on a file (for the export record and ``info``)."""
    out = []
    for reader in READERS.values():
        v = judge(reader, family, fmt, names)
        out.append({"reader": reader.key, "status": v.status, "dropped": v.dropped, "line": v.line()})
    return out


def companion_instructions(companion_file: str, modules: dict[str, list[str]], lora_file: str) -> str:
    """How to use a target's companion file, in one paragraph (printed and stored in the file's metadata)."""
    readers = sorted({r for rs in modules.values() for r in rs})
    return (f"{' and '.join(readers)} cannot load {len(modules)} module(s) of this erasure as a LoRA "
            f"({', '.join(sorted(modules))}); their edited weights (W + ΔW, diffusers names) are in {companion_file}. "
            f"Load them into the base model first — `trace_erase.artifacts.export.apply_full(pipe, "
            f"'{companion_file}')`, or `denoiser.load_state_dict(safetensors.torch.load_file('{companion_file}'), "
            f"strict=False)` — save that model, and apply {lora_file} to it.")
