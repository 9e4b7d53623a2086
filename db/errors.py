"""The errors the database layer raises for a request it cannot do.

One root, :class:`DbError`; the admin HTTP boundary maps each subclass to a status
code (not found: 404, conflict: 409, any other: 400).
"""

from __future__ import annotations


class DbError(Exception):
    """A request on the queue that cannot be done."""


class NotFound(DbError):
    """No such job, result or study."""


class Conflict(DbError):
    """The object is not in a state that allows the action."""
