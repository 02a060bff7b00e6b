"""Checkpoints of long runs (stage B, toy training): written atomically and verified when read.

A checkpoint file is one line with the sha256 of the payload, then the payload (``torch.save`` bytes). A kill while
writing leaves the previous checkpoint (temporary file, then rename); a truncated or bit-flipped file is refused with
one line instead of resuming from garbage (``torch.load`` checks no checksum of tensor data).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceEraseError
from ..io import atomic_write

MAGIC = b"trace-erase-checkpoint sha256="


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically with its checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write(path, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; one line (naming the file and the fix) if it is
    corrupt, truncated or not a checkpoint. The file is left as it is."""
    path = Path(path)
    fix = "delete it to start that run afresh (or pass --overwrite)"
    data = path.read_bytes()
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise TraceEraseError(f"'{path}' is not a trace-erase checkpoint (or is truncated); {fix}")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise TraceEraseError(f"the checkpoint '{path}' is corrupt (checksum mismatch); {fix}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable despite the checksum: written by something else
        raise TraceEraseError(f"the checkpoint '{path}' cannot be read ({type(exc).__name__}); {fix}") from exc
    if not isinstance(state, dict):
        raise TraceEraseError(f"'{path}' does not hold a checkpoint state; {fix}")
    return state
