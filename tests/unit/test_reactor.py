"""node.receive.reactor's replacements of pynetdicom internals give what pynetdicom gives."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from node.receive.reactor import EventDrivenDUL, LargeReadSocket, make_event_driven


@pytest.fixture(autouse=True)
def _no_default_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the node runs pynetdicom (quiet_pynetdicom): no logging handlers bound."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


def _association() -> Association:
    ae = AE("TEST")
    assoc = Association(ae, "acceptor")
    return make_event_driven(assoc)


def _p_data_tf(items: list[tuple[int, bytes]]) -> bytearray:
    primitive = P_DATA()
    for context_id, value in items:
        primitive.presentation_data_value_list.append((context_id, value))
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytearray(pdu.encode())


def test_p_data_tf_is_decoded_as_pynetdicom_decodes_it() -> None:
    assoc = _association()
    assert isinstance(assoc.dul, EventDrivenDUL)
    raw = _p_data_tf([(1, b"\x03" + b"c" * 99), (3, b"\x02" + bytes(range(256)) * 300)])
    fast, event = assoc.dul._decode_pdu(raw)
    assert isinstance(fast.presentation_data_value_items[1].presentation_data_value,
                      memoryview)  # the fast path, not a copy
    stock, stock_event = DULServiceProvider._decode_pdu(assoc.dul, raw)
    assert event == stock_event == "Evt10"
    got = [(c, bytes(v)) for c, v in fast.to_primitive().presentation_data_value_list]
    assert got == list(stock.to_primitive().presentation_data_value_list)


@pytest.mark.parametrize("damage", ["item longer than the PDU", "empty item", "truncated"])
def test_a_malformed_p_data_tf_is_refused(damage: str) -> None:
    raw = _p_data_tf([(1, b"\x03" + b"x" * 50)])
    if damage == "item longer than the PDU":
        struct.pack_into(">I", raw, 6, 5000)
    elif damage == "empty item":
        struct.pack_into(">I", raw, 6, 0)
    else:
        raw = raw[:8]
    with pytest.raises(ValueError):
        _association().dul._decode_pdu(raw)


def test_a_bound_pdu_handler_gets_pynetdicom_s_own_decoding() -> None:
    assoc = _association()
    seen: list[object] = []
    assoc.bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu))
    pdu, _ = assoc.dul._decode_pdu(_p_data_tf([(1, b"\x03abc")]))
    assert seen == [pdu]
    assert isinstance(pdu.presentation_data_value_items[0].presentation_data_value, bytes)


def test_large_reads_return_what_was_sent_and_stop_at_a_closed_connection() -> None:
    left, right = socket.socketpair()
    assoc = _association()
    wrapper = LargeReadSocket(assoc, client_socket=left)
    payload = bytes(range(256)) * 4000

    def send() -> None:
        right.sendall(payload[:300_000])
        right.sendall(payload[300_000:])
        right.sendall(b"tail")
        right.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert bytes(wrapper.recv(len(payload))) == payload
    sender.join()
    assert bytes(wrapper.recv(100)) == b"tail"  # closed early: what arrived
    left.close()
