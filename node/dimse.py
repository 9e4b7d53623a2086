"""DIMSE vocabulary that both the receiver and the sender use, taken from pynetdicom."""

from __future__ import annotations

from typing import Final

from pynetdicom import sop_class

VERIFICATION: Final[str] = str(sop_class.Verification)  # type: ignore[attr-defined]
"""Verification SOP Class (C-ECHO); pynetdicom makes its constants at import, untyped."""
