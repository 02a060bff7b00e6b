"""File-system primitives every command writes through: atomic files, atomic output folders, resumable work folders.

A kill at any instant leaves either the old output or the new one, never half of either: a file is written beside its
final name and renamed; a folder is filled under a temporary sibling name and moved into place when complete.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TraceEraseError


def check_writable(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """Refuse an existing output folder unless ``overwrite``; creates nothing (a check to run before a model loads)."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise TraceEraseError(f"{what} folder '{final}' already exists; choose another --output or pass --overwrite")
    return final


@contextmanager
def output_folder(path: str | Path, overwrite: bool, what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to fill; on success it replaces ``path`` in one step, on any
    exception (a kill included) it is removed, so ``path`` never holds a partial output."""
    final = check_writable(path, overwrite, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write a file beside its final name, then rename it there: a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def commit_folder(tmp: Path, final: Path) -> None:
    """Move a completed temporary folder into place. An existing folder is swapped with it in one atomic step, so at
    every instant ``final`` holds either the old complete folder or the new one; the old one is deleted after."""
    if final.exists():
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            return
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"  # fallback: a short window
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def prepare_workdir(final: str | Path, resume: bool, overwrite: bool, what: str = "run") -> Path:
    """``FINAL.partial``: where a long command keeps its progress. Left over from an interrupted run it is continued
    with ``resume``, cleared with ``overwrite``, and otherwise refused (so no work is lost by accident)."""
    final = Path(final)
    work = final.parent / (final.name + ".partial")
    if work.exists() and not resume:
        if not overwrite:
            raise TraceEraseError(f"an interrupted {what} left '{work}'; pass --resume to continue it "
                                  "or --overwrite to start afresh")
        shutil.rmtree(work)
    return work


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_label(label: str) -> str:
    """A row label as one file or folder name: a sweep value that is a path (``neighbour_vocab=data/words.txt``)
    keeps its text with the separators replaced."""
    return label.replace("/", "_").replace("\\", "_")


def run_folder(folder: str | Path, concept: str, label: str) -> Path:
    """Where a bench keeps one (concept, row label) run: ``folder/runs/<concept>/<label as a file name>``."""
    return Path(folder) / "runs" / concept / file_label(label)
