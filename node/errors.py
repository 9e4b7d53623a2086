"""The node's error types: one tree, each a named condition.

Each maps to a DICOM status or HTTP code at the boundary that meets it
(:func:`node.receive.scp.status_for` for a refused instance), never by its text.
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid."""


class StorageError(NodeError):
    """An instance or result could not be stored durably (I/O error)."""


class StorageFull(StorageError):
    """Free space is below ``storage.min_free_mb``."""


class InstanceTooLarge(StorageError):
    """An instance is larger than ``dicom.max_instance_mb``."""


class JournalWriteError(StorageError, OSError):
    """A record could not be written whole; the segment takes no more records."""


class IngestStopped(StorageError):
    """The ingest thread stopped after an error: nothing more can be made durable."""


class InvalidInstance(NodeError):
    """A received dataset cannot be understood (missing or malformed UIDs, bad encoding)."""


class SOPClassMismatch(InvalidInstance):
    """The dataset's SOP Class UID is not the one of the C-STORE request."""


class SendError(NodeError):
    """A C-STORE to a destination failed.

    ``retryable`` is False for refusals that will not change by themselves
    (e.g. the SOP class is not supported by the destination).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StartupError(NodeError):
    """A part of the node (an acceptor process, the admin server) did not start."""
