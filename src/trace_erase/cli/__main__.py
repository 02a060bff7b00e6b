"""``python -m trace_erase.cli`` (what ``accelerate launch -m trace_erase.cli`` runs)."""

import sys

from .app import main

sys.exit(main())
