"""Named error types. Each maps to a DICOM status or HTTP code at the boundary."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid."""


class StorageError(NodeError):
    """An instance could not be stored durably (disk full, I/O error)."""


class InvalidInstance(NodeError):
    """A received dataset cannot be understood (missing or malformed UIDs, bad encoding)."""


class InferenceError(NodeError):
    """A model failed on a job."""


class SendError(NodeError):
    """A C-STORE to a destination failed.

    ``retryable`` is False for refusals that will not change by themselves
    (e.g. the SOP class is not supported by the destination).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
