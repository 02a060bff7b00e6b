"""The ``trace-erase`` command line: a typer app over the library, one module per group of commands.

``erase``, ``generate``, ``info``, ``merge`` and ``demo`` live in :mod:`.app`; ``export`` in :mod:`.export`; ``eval``,
``rescore`` and ``bench`` in :mod:`.evaluate`; ``attack`` in :mod:`.attack`; ``toyworld ...`` in :mod:`.toyworld`.
Only this package imports typer: the library raises :class:`~trace_erase.errors.TraceEraseError`, and :func:`main`
turns it into one line on stderr and exit code 2.
"""

from .app import app, main

__all__ = ["app", "main"]
