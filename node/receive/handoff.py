"""The channel between the serve process and an acceptor process (``dicom.acceptors`` > 1).

The serve process sends each accepted connection (SCM_RIGHTS) with the peer's
address as JSON; the acceptor answers with one byte per event: :data:`READY`
once, :data:`ENDED` whenever an association ends, and an outcome byte
(:data:`OUTCOME_BYTES`) per association, counted in the serve process's metrics.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

from node.receive.server import PeerAddress, ReceiverServer

READY = b"r"
"""Sent once by an acceptor process to the serve process when it takes connections."""
ENDED = b"d"
"""Sent by an acceptor process to the serve process whenever one of its associations ends."""
OUTCOME_BYTES = {"accepted": b"a", "rejected": b"j"}
"""Sent by an acceptor process for each association outcome (the metrics live in serve)."""


def encode_address(address: tuple[str, int]) -> bytes:
    """The message that goes with a handed-over connection: the peer's address."""
    return json.dumps([address[0], address[1]]).encode()


class HandoffServer(ReceiverServer):
    """An association server fed connected sockets by another process (``dicom.acceptors``).

    It has no listening socket: its ``socket`` is a Unix channel on which the serve
    process sends each accepted connection (SCM_RIGHTS) with the peer's address.
    It answers on the same channel with one byte whenever an association ends, so
    the serve process knows how busy each acceptor is.
    """

    def __init__(self, *args: Any, channel: socket.socket, **kwargs: Any) -> None:
        self.channel = channel
        self.parent_gone = threading.Event()
        self._send_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the TCP socket socketserver made: not used
        self.socket = self.channel

    def server_activate(self) -> None:
        pass

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        message, fds, _flags, _address = socket.recv_fds(self.channel, 4096, 1)
        if not fds:
            if not message:  # the serve process is gone: stop
                self.parent_gone.set()
            raise OSError("no connection in the message")
        client = socket.socket(fileno=fds[0])
        host, port = json.loads(message)
        return self.prepare_client(client), (str(host), int(port))

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: PeerAddress) -> bool:
        return self.admit(client_address)  # allowed_networks: checked by the serve process

    def association_ended(self, client_address: PeerAddress) -> None:
        super().association_ended(client_address)
        self.report(ENDED)

    def report_outcome(self, outcome: str) -> None:
        self.report(OUTCOME_BYTES[outcome])

    def report(self, what: bytes) -> None:
        """Tell the serve process (one byte: ENDED, or an association outcome)."""
        with self._send_lock, contextlib.suppress(OSError):
            self.channel.send(what)

    def server_close(self) -> None:
        self.channel.close()
