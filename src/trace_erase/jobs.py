"""An erase as a user states it — a YAML config and/or explicit values — checked whole before any model loads, then
run resumably into its output folder (with an optional export beside the erasure). ``trace-erase erase`` is a thin
layer over :class:`EraseJob`; Python users can drive it the same way."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import erase, export_erasure, method_configs
from .artifacts.checkpoint import load_checkpoint
from .artifacts.erasure import Erasure
from .artifacts.export import ExportOptions, check_gate
from .config import make_concepts
from .engines.trajectory import CHECKPOINT_NAME
from .errors import TraceEraseError
from .io import check_writable, prepare_workdir
from .methods import MethodSpec, get_method
from .models import load_model
from .models.loading import peek_family
from .multi import process_rank, resolve_multi
from .runtime import Runtime

CONFIG_KEYS = ("model", "method", "concepts", "anchor", "preserve", "output", "options")


@dataclass
class EraseJob:
    """What to erase from which model, how, and where to write it."""

    model: str
    output: str
    concepts: list[Any]
    method: str = "trace-closed-form"
    anchor: str | None = None
    preserve: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # engine options, the YAML / --option keys
    export: ExportOptions | None = None  # also write OUTPUT/export-FORMAT.safetensors

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, where: str = "the config", **given: Any) -> EraseJob:
        """A job from a YAML mapping (:data:`CONFIG_KEYS`) with ``given`` values (not None) overriding it; the
        engine options of both are merged, ``given``'s winning. One line for a missing model, output or concept."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise TraceEraseError(f"unknown keys {unknown} in '{where}'; valid: {', '.join(sorted(CONFIG_KEYS))}")
        options = {**(config.get("options") or {}), **(given.pop("options", None) or {})}
        values = {k: config.get(k) for k in CONFIG_KEYS if k != "options"}
        values.update({k: v for k, v in given.items() if v is not None and v != []})
        if not values.get("model"):
            raise TraceEraseError("no model given; pass --model (a diffusers folder, hub id, or toy-sd)")
        if not values.get("output"):
            raise TraceEraseError("no output folder given; pass --output DIR")
        if not values.get("concepts"):
            raise TraceEraseError("no concept given; pass at least one --concept")
        values["method"] = values.get("method") or "trace-closed-form"
        concepts = values["concepts"]
        values["concepts"] = [concepts] if isinstance(concepts, (str, dict)) else list(concepts)  # `concepts: cat`
        return cls(options=options, **values)

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def check(self, runtime: Runtime, overwrite: bool) -> None:
        """Every check that needs no model: output, method and family, concepts, options (with the combination
        mode), the runtime's ability to train, and the export's options against the gate."""
        check_writable(self.output, overwrite, "erasure output")
        spec = self.spec
        family = peek_family(self.model)
        spec.check_family(family)
        make_concepts(self.concepts, anchor=self.anchor, preserve=self.preserve)
        mode = resolve_multi(spec, self.options.get("multi"), len(self.concepts))  # erase() resolves it again
        several = {"multi": mode} if spec.uses_trajectory and mode != "single" else {}  # as erase() passes it
        _, trajectory = method_configs(spec, {**self.engine_options, **several}, family)
        if spec.uses_trajectory:
            runtime.check_training()
        if self.export is not None:
            gate = trajectory.gate_tau if trajectory is not None else None
            check_gate({"tau": gate} if gate is not None else None, self.export)

    @property
    def engine_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k != "multi"}

    def run(self, runtime: Runtime, resume: bool = False, overwrite: bool = False, allow_pickle: bool = False,
            progress: bool = True) -> tuple[Erasure, Path, list[dict[str, Any]]] | None:
        """Check, load the model, erase (stage B's progress kept in ``OUTPUT.partial`` for ``resume``) and write the
        erasure folder with its export. Returns (erasure, folder, export records), or None on a process that is not
        the main one under ``accelerate launch`` (it trained its share; the main one writes)."""
        self.check(runtime, overwrite)
        spec, final = self.spec, Path(self.output)
        workdir = prepare_workdir(final, resume, overwrite, "erase")
        if (workdir / CHECKPOINT_NAME).is_file():  # a corrupt checkpoint is refused before anything runs
            load_checkpoint(workdir / CHECKPOINT_NAME)
        handle = load_model(self.model, allow_pickle=allow_pickle, runtime=runtime)
        result = erase(handle, self.concepts, method=self.method, anchor=self.anchor, preserve=self.preserve,
                       workdir=workdir if spec.uses_trajectory else None, progress=progress, **self.options)
        if process_rank() != 0:
            return None
        records: list[dict[str, Any]] = []

        def write_export(folder: Path) -> None:
            target = folder / f"export-{self.export.name}.safetensors"
            records.append(export_erasure(result, handle, self.export, target, overwrite=True))
            # written before the manifest: erasure.json says which exports ship in the folder (and an ungated one)
            rec = records[-1]
            result.manifest["exports"] = [{"file": target.name, "format": rec["format"], "target": rec["target"],
                                           "max_rank": self.export.max_rank, "ungated": rec["ungated"],
                                           "files": list(rec["files"])}]

        try:
            path = result.save(final, overwrite=overwrite, extra=write_export if self.export else None)
        except TraceEraseError as exc:
            if spec.uses_trajectory and workdir.is_dir():
                raise TraceEraseError(f"{exc}; stage B's progress is kept in '{workdir}': run again with --resume "
                                      "and other export options") from exc
            raise
        shutil.rmtree(workdir, ignore_errors=True)
        return result, path, records
