"""Logging set-up: one line per event, to stderr (the journal under systemd).

Log lines carry UIDs and job ids, never patient names or IDs.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure(level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "alembic", "highdicom", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
