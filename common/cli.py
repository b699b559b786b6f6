"""How every command line of the harness ends on bad input: ONE line ``error: <message>`` on stderr and exit
status 2 (argparse's convention for a usage error), distinct from 1 (something failed while running: a run, a
judge endpoint)."""

from __future__ import annotations

import sys
from typing import NoReturn

BAD_INPUT = 2


def fail(message: object, status: int = BAD_INPUT) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr (whitespace collapsed) and exit with ``status``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)
