"""``TcpDestination.resume`` (the sender's side of the switch-over over TCP): only an
explicit ``{ok: false}`` from the receiver is a refusal (the destination did not resume);
any other ending — a malformed reply, a reply that is not a map, the connection closing —
leaves the outcome unknown (DestinationUnknown: the source stays paused), never "gone".
A fake receiver on loopback plays the other side; no VMM is needed."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
import trio

from vmipc.sequences import Refused, TcpDestination
from vmipc.sequences._migrate import DestinationUnknown


def _frame(obj: object) -> bytes:
    payload = msgpack.packb(obj)
    return struct.pack("<I", len(payload)) + payload


def _read_frame(conn: socket.socket) -> dict:
    header = conn.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack("<I", header)
    return msgpack.unpackb(conn.recv(length, socket.MSG_WAITALL))


def _fake_receiver(answer_resume: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            assert _read_frame(conn)["op"] == "hello"
            conn.sendall(_frame({"ok": True}))
            assert _read_frame(conn)["op"] == "resume"
            answer_resume(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def _resume_against(answer_resume: Callable[[socket.socket], None]) -> None:
    port, thread = _fake_receiver(answer_resume)
    dest = TcpDestination(("127.0.0.1", port))

    async def main() -> None:
        await dest.prepare(64 << 20, 2)
        await dest.resume()

    try:
        trio.run(main)
    finally:
        dest.close()
        thread.join(10)


UNKNOWN_ENDINGS = {
    "not a map": lambda conn: conn.sendall(_frame([1, 2, 3])),
    "not msgpack": lambda conn: conn.sendall(struct.pack("<I", 2) + b"\xc1\xc1"),
    "a frame over the limit": lambda conn: conn.sendall(struct.pack("<I", 1 << 30)),
    "the connection closing": lambda conn: None,
    "ok missing": lambda conn: conn.sendall(_frame({"state": "running"})),
}


@pytest.mark.parametrize("ending", sorted(UNKNOWN_ENDINGS))
def test_anything_but_an_explicit_refusal_after_resume_is_unknown(ending: str) -> None:
    with pytest.raises(DestinationUnknown):
        _resume_against(UNKNOWN_ENDINGS[ending])


def test_an_explicit_refusal_of_resume_is_a_refusal() -> None:
    with pytest.raises(Refused, match="invalid-state"):
        _resume_against(lambda conn: conn.sendall(_frame({"ok": False, "error": "invalid-state"})))
