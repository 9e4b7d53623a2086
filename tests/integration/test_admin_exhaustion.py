"""A slowloris on the admin port cannot take the DICOM port down.

The admin server and the receiver share one process, and so its file descriptors.
Here a second process opens 200 connections to a real admin server (more than its
``admin.max_connections``) and trickles a request line into each, never finishing
it, while this process, the node, runs with only about 120 descriptors to spare:
without the connection cap the flood would take them all. The DICOM port must still
answer a C-ECHO, the admin server must hold no more than its cap, and every slow
connection must be closed: those beyond the cap at once, the others once
``admin.request_timeout`` has passed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2

from node.admin.server import start_admin
from node.settings import DicomSettings
from tests.conftest import Factory
from tests.integration.test_admin_api import settings_for
from tests.peers import echoscu, free_port, wait_until
from tests.receiver import running_receiver

CONNECTIONS = 200
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 2.0
SPARE_DESCRIPTORS = 120

# The attacker, in a process of its own (its sockets are not the node's descriptors).
# Prints a JSON object: per connection, seconds from its connect to the server closing it
# (null: still open when it gave up), and when all connects were done.
SLOWLORIS = r"""
import json, resource, selectors, socket, sys, time
port, count, give_up = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not the node's lowered limit
line = b"GET /healthz?" + b"a" * 4000 + b" HTTP/1.1\r\n"
sel = selectors.DefaultSelector()
opened, closed, sent = {}, {}, {}
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    opened[i], sent[i] = time.monotonic(), 0
    sel.register(s, selectors.EVENT_READ, i)
connected = time.monotonic()
print(json.dumps({"connected": True}), flush=True)
next_byte = 0.0
while len(closed) < count and time.monotonic() - connected < give_up:
    now = time.monotonic()
    if now >= next_byte:  # one more byte of the request line to each open connection
        next_byte = now + 0.3
        for key in list(sel.get_map().values()):
            i = key.data
            try:
                key.fileobj.send(line[sent[i]:sent[i] + 1])
                sent[i] += 1
            except OSError:
                closed[i] = now - opened[i]
                sel.unregister(key.fileobj)
                key.fileobj.close()
    for key, _ in sel.select(timeout=0.05):
        i = key.data
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            closed[i] = time.monotonic() - opened[i]
            sel.unregister(key.fileobj)
            key.fileobj.close()
print(json.dumps({"closed": [closed.get(i) for i in range(count)],
                  "connect_seconds": connected - min(opened.values())}), flush=True)
"""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def few_descriptors(spare: int) -> Iterator[None]:
    """Lower this process's soft limit on open files to what it has open plus ``spare``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_descriptors() + spare, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_slow_http_clients_leave_the_dicom_port_answering(tmp_path: Path,
                                                          factory: Factory) -> None:
    dicom_port, admin_port = free_port(), free_port()
    settings = settings_for(tmp_path, f"port = {admin_port}\nmax_connections = {MAX_CONNECTIONS}"
                                      f"\nrequest_timeout = {REQUEST_TIMEOUT}\n")
    dicom = DicomSettings(host="127.0.0.1", port=dicom_port)
    with running_receiver(tmp_path / "store", factory, dicom):
        admin = start_admin(settings, factory)
        assert admin is not None
        try:
            assert echoscu(dicom_port) == 0
            with few_descriptors(SPARE_DESCRIPTORS):
                baseline = open_descriptors()
                attacker = subprocess.Popen(
                    [sys.executable, "-c", SLOWLORIS, str(admin_port), str(CONNECTIONS),
                     str(REQUEST_TIMEOUT + 8)], stdout=subprocess.PIPE, text=True)
                assert attacker.stdout is not None
                try:
                    assert json.loads(attacker.stdout.readline()) == {"connected": True}
                    # The slow connections are held: the admin server has its cap open,
                    # and the node's descriptors grew by no more than that.
                    wait_until(lambda: admin.open_connections() == MAX_CONNECTIONS, 5,
                               what="the admin server's slots full")
                    assert open_descriptors() <= baseline + MAX_CONNECTIONS + 2
                    started = time.monotonic()
                    assert echoscu(dicom_port) == 0  # the DICOM port answers meanwhile
                    assert time.monotonic() - started < REQUEST_TIMEOUT  # during the flood
                    assert admin.open_connections() <= MAX_CONNECTIONS
                    report = json.loads(attacker.stdout.readline())
                finally:
                    if attacker.poll() is None:
                        attacker.kill()
                    attacker.wait()
                    attacker.stdout.close()
            closed = report["closed"]
            assert None not in closed  # every slow connection was closed by the server
            held = [t for t in closed if t >= REQUEST_TIMEOUT * 0.8]
            assert 0 < len(held) <= MAX_CONNECTIONS  # the cap; the rest closed on arrival
            assert max(held) < REQUEST_TIMEOUT + 2 + report["connect_seconds"]
            assert admin.slots.refused >= CONNECTIONS - MAX_CONNECTIONS
            # Once they are gone, the admin server answers again.
            wait_until(lambda: admin.open_connections() == 0, 5, what="slots freed")
            reply = httpx2.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=10)
            assert reply.status_code == 200
        finally:
            admin.stop()
