"""Logging set-up: one line per event, to stderr (the journal under systemd).

Log lines carry UIDs and job ids, never patient names or IDs. Those UIDs come from
the network: a record's text (message, arguments, traceback) is written with its
control characters escaped, so a value cannot start a forged line or put raw bytes
into the journal.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: Libraries whose INFO chatter is left out: they log at WARNING or above.
QUIET_LOGGERS = ("pynetdicom", "apscheduler", "alembic", "highdicom", "PIL")

#: Characters that end or mangle a line (C0 and C1 controls, DEL, Unicode line and
#: paragraph separators), each shown as its Python escape: ``\n``, ``\x00``, ``\u2028``.
_ESCAPES = {
    code: repr(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character replaced by its Python escape: one line.

    Characters in ``keep`` (say ``"\\n"`` for a console that lays out lines itself)
    are left as they are; so is a backslash: the escapes show what was received,
    they are not meant to be decoded back.
    """
    table = _ESCAPES if not keep else {c: e for c, e in _ESCAPES.items() if chr(c) not in keep}
    return text.translate(table)


class OneLineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose every record is one line.

    The whole formatted record (message with its arguments, exception and stack
    text) goes through :func:`escape_controls`: a traceback's line breaks show as
    ``\\n`` in the one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def configure(level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
