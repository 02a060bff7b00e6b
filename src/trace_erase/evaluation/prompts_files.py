"""Loaders for the prompt files users bring: I2P, MACE-style object/celebrity/art CSVs (``type,prompt,
evaluation_seed``), COCO captions (JSON or CSV), and a plain list (``.txt``, one prompt per line)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TraceEraseError

FORMATS: dict[str, tuple[str, ...]] = {
    # I2P (Schramowski et al.): per-prompt seed and guidance
    "i2p": ("prompt", "evaluation_seed", "evaluation_guidance", "categories"),
    # MACE's evaluation CSVs: prompt, evaluation_seed, class/celebrity/artist column
    "mace": ("prompt", "evaluation_seed"),
    # a caption file: one prompt per row
    "captions": ("prompt",),
}


@dataclass
class PromptRecord:
    """One prompt from a file, with its own seed/guidance when the file gives them."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    label_column: str | None = None  # the column ``label`` came from (None: the file has no label column)


# columns that name what a row shows (class / identity / artist), in the order they are looked for
LABEL_COLUMNS = ("class", "celebrity", "artist", "type", "label", "concept")


def read_prompts(path: str | Path, kind: str = "auto") -> list[PromptRecord]:
    """Read a CSV (I2P / MACE-style / captions) or a COCO captions JSON; missing columns are named in the error."""
    p = Path(path)
    try:
        exists = p.is_file()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise TraceEraseError(f"prompts file '{str(path)[:80]}…' cannot be read ({exc.strerror}); pass a path to a "
                              ".csv, .json or .txt file") from None
    if not exists:
        raise TraceEraseError(f"prompts file '{path}' does not exist")
    if p.suffix == ".json":
        return _coco_json(p)
    if p.suffix == ".txt":
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise TraceEraseError(f"'{path}' has no prompts (a .txt prompt list has one prompt per line)")
        return [PromptRecord(line) for line in lines]
    if p.suffix.lower() not in (".csv", ".tsv"):
        raise TraceEraseError(f"unsupported prompts file '{p.name}'; pass a CSV (I2P, MACE-style "
                              "type,prompt,evaluation_seed, or a prompt column), a COCO captions .json or a .txt list")
    try:
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v.strip() if isinstance(v, str) else "") for k, v in row.items()}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceEraseError(f"'{path}' is not a readable UTF-8 CSV ({exc}); save it as UTF-8 CSV") from exc
    if kind == "auto":
        kind = "i2p" if "categories" in columns else "mace" if "evaluation_seed" in columns else "captions"
    if kind not in FORMATS:
        raise TraceEraseError(f"unknown prompts format '{kind}'; choose one of {', '.join(FORMATS)}")
    missing = [c for c in FORMATS[kind] if c not in columns]
    if missing:
        raise TraceEraseError(f"'{path}' lacks the column(s) {', '.join(missing)} that a {kind} file needs "
                              f"(it has: {', '.join(columns) or 'none'})")
    if not rows:
        raise TraceEraseError(f"'{path}' has no rows")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    out = []
    for i, row in enumerate(rows):
        try:
            seed = int(float(row["evaluation_seed"])) if row.get("evaluation_seed") else None
            guidance = float(row["evaluation_guidance"]) if row.get("evaluation_guidance") else None
        except ValueError as exc:
            raise TraceEraseError(f"'{path}' row {i + 2}: bad number ({exc}); fix the seed/guidance value") from exc
        if not row["prompt"]:
            raise TraceEraseError(f"'{path}' row {i + 2}: empty prompt; fill it in or remove the row")
        out.append(PromptRecord(row["prompt"], seed, guidance, row.get(label_col) if label_col else None,
                                {k: v for k, v in row.items() if k not in ("prompt",)}, label_col))
    return out


def _coco_json(p: Path) -> list[PromptRecord]:
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise TraceEraseError(f"'{p}' is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or "annotations" not in data:
        raise TraceEraseError(f"'{p}' lacks 'annotations' (a COCO captions file has annotations[].caption)")
    records = [PromptRecord(a["caption"].strip(), None, None, None, {"image_id": str(a.get("image_id"))})
               for a in data["annotations"] if isinstance(a, dict) and str(a.get("caption", "")).strip()]
    if not records:
        raise TraceEraseError(f"'{p}' has no captions (annotations[].caption)")
    return records
