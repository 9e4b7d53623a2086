"""Crash points for the crash tests: ``AINODE_CRASH_AT=POINT:N:MARKER`` kills the process
with SIGKILL the N-th time it reaches ``POINT``, once (the marker file records that it
happened, so a restarted process does not crash again).

Unset (always, outside the crash tests), :func:`crash_point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from functools import cache
from pathlib import Path

ENV = "AINODE_CRASH_AT"
POINTS = (
    "scp.received",     # an instance arrived; nothing written yet
    "scp.durable",      # journaled durably, success not yet answered
    "ingest.files",     # instance files written, rows not yet committed
    "worker.predicted",  # inference done, nothing written
    "worker.written",   # result files written, job not yet marked done
    "sender.stored",    # the PACS acknowledged a C-STORE, not yet recorded as sent
)


@cache
def _plan() -> tuple[str, int, Path] | None:
    value = os.environ.get(ENV, "")
    if not value:
        return None
    point, count, marker = value.split(":", 2)
    if point not in POINTS:
        raise ValueError(f"{ENV}: unknown crash point {point!r}")
    return point, int(count), Path(marker)


@cache
def _hits() -> Counter[str]:
    return Counter()


def crash_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up) when the crash test asked for it."""
    plan = _plan()
    if plan is None or plan[0] != name:
        return
    hits = _hits()
    hits[name] += 1
    if hits[name] == plan[1] and not plan[2].exists():
        plan[2].write_text(f"{name} {plan[1]} pid {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
