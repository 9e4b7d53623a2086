"""A per-destination circuit breaker for the sender.

CLOSED normally. After ``failure_threshold`` consecutive connection-level
failures (no association, or the association was lost) a destination's circuit
OPENs: no association is attempted for ``open_seconds`` and its results are left
untouched (not claimed, no attempt counted, no backoff change). After the
cool-down one trial is let through (HALF-OPEN): success closes the circuit, failure
re-opens it with a cool-down twice as long as the last, up to ``max_open_seconds``.
Per-object refusals are not connection failures: a destination that answers is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("ainode.breaker")


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class _Circuit:
    state: State = State.CLOSED
    failures: int = 0
    """Consecutive connection failures while closed."""
    opens: int = 0
    """Consecutive openings without a success in between (the cool-down grows with it)."""
    until: float = 0.0
    """Clock reading at which an open circuit's cool-down ends."""
    trial: bool = False
    """Half-open: the one trial has been handed out and its outcome is not yet known."""


class CircuitBreaker:
    """Circuit state per destination name; thread-safe; ``clock`` gives seconds (monotonic)."""

    def __init__(self, failure_threshold: int = 3, open_seconds: float = 30.0,
                 max_open_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if open_seconds <= 0:
            raise ValueError("open_seconds must be positive")
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.max_open_seconds = max(open_seconds, max_open_seconds or open_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}

    def state(self, name: str) -> State:
        """The destination's state as stored (an OPEN circuit past its cool-down reads OPEN)."""
        with self._lock:
            circuit = self._circuits.get(name)
            return circuit.state if circuit else State.CLOSED

    def blocked(self, name: str) -> bool:
        """True when :meth:`allow` would refuse now (changes nothing)."""
        with self._lock:
            return self._blocked(self._circuits.get(name))

    def _blocked(self, circuit: _Circuit | None) -> bool:
        if circuit is None or circuit.state is State.CLOSED:
            return False
        if circuit.state is State.OPEN:
            return self._clock() < circuit.until
        return circuit.trial

    def allow(self, name: str) -> bool:
        """May an association be attempted now? A past-cool-down OPEN circuit goes HALF-OPEN
        and this call takes its one trial; report the outcome with :meth:`record_success`,
        :meth:`record_failure` or (nothing was attempted after all) :meth:`release`."""
        with self._lock:
            circuit = self._circuits.get(name)
            if circuit is None or circuit.state is State.CLOSED:
                return True
            if self._blocked(circuit):
                return False
            if circuit.state is State.OPEN:
                self._change(name, circuit, State.HALF_OPEN, "cool-down over; one trial")
            circuit.trial = True
            return True

    def release(self, name: str) -> None:
        """Give back a half-open trial that was not used (nothing to send)."""
        with self._lock:
            circuit = self._circuits.get(name)
            if circuit is not None and circuit.state is State.HALF_OPEN:
                circuit.trial = False

    def record_success(self, name: str) -> None:
        """An association was established (and not lost): close the circuit."""
        with self._lock:
            circuit = self._circuits.get(name)
            if circuit is None:
                return
            if circuit.state is not State.CLOSED:
                self._change(name, circuit, State.CLOSED, "association succeeded")
            del self._circuits[name]

    def record_failure(self, name: str, why: str) -> None:
        """A connection-level failure: count it; open at the threshold, re-open a trial."""
        with self._lock:
            circuit = self._circuits.setdefault(name, _Circuit())
            if circuit.state is State.OPEN:
                return  # a straggler from before the circuit opened
            if circuit.state is State.HALF_OPEN:
                self._open(name, circuit, f"trial failed: {why}")
                return
            circuit.failures += 1
            if circuit.failures >= self.failure_threshold:
                self._open(name, circuit, f"{circuit.failures} consecutive connection "
                                          f"failures, last: {why}")

    def _open(self, name: str, circuit: _Circuit, why: str) -> None:
        seconds = min(self.open_seconds * 2 ** circuit.opens, self.max_open_seconds)
        circuit.opens += 1
        circuit.failures = 0
        circuit.trial = False
        circuit.until = self._clock() + seconds
        self._change(name, circuit, State.OPEN, f"{why}; no attempt for {seconds:g} s")

    @staticmethod
    def _change(name: str, circuit: _Circuit, state: State, why: str) -> None:
        circuit.state = state
        level = logging.INFO if state is State.CLOSED else logging.WARNING
        log.log(level, "destination %s circuit %s: %s", name, state.value, why)
