"""What every benchmark script shares with the CLI: bad input is one line and exit 2; JSON lands whole or not at all.

Scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and ``from _script import ...`` works.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from trace_erase.errors import TraceEraseError
from trace_erase.io import atomic_write


def refuse(message: str) -> NoReturn:
    """Bad input: print one line naming the fix and exit 2, as ``trace-erase`` does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a :class:`TraceEraseError` (bad option, missing file) becomes :func:`refuse`."""
    try:
        code = main()
    except TraceEraseError as exc:
        refuse(str(exc))
    raise SystemExit(code if isinstance(code, int) else 0)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented JSON beside ``path`` and rename it there: a kill never leaves half a file."""
    atomic_write(path, json.dumps(value, indent=2) + "\n")
