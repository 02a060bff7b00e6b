"""User-facing errors.

Every mistake a user can make (bad path, unsupported model, bad concept, ...) raises :class:`TraceEraseError`
with a single line that says what is wrong and how to fix it. The CLI prints that line and exits non-zero.
"""

from __future__ import annotations


class TraceEraseError(Exception):
    """A one-line, user-actionable error (the CLI prints it without a traceback)."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)


class NonFiniteLossError(TraceEraseError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""
