"""ServerProtocol and ClientProtocol talking through byte strings only."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from vmipc.protocol import (
    DEFAULT_MAX_REQUEST_SIZE,
    MAX_ERROR_SIZE,
    ClientProtocol,
    ConnectionBroken,
    DecodeLimits,
    Error,
    ErrorInfo,
    InputEnded,
    LocalProtocolError,
    RemoteProtocolError,
    RequestReceived,
    RequestRejected,
    Result,
    Schema,
    ServerProtocol,
    ServerState,
    encode_frame,
    load_schema,
    pack,
)
from vmipc.protocol._connection import Limits

FD_SCHEMA_EXTRA = {
    "commands": [
        {
            "name": "write-to",
            "since": "1.0",
            "doc": "test command taking an out fd",
            "args": [{"name": "n", "type": "int", "default": 1, "doc": "."}],
            "fds": [{"name": "out", "direction": "out", "doc": "."}],
            "result": {"type": "map"},
            "states": "any",
            "errors": [],
            "cancellable": True,
            "progress": True,
        }
    ]
}


def schema() -> Schema:
    return load_schema().extended(FD_SCHEMA_EXTRA)


def request(rid: Any, command: str, **fields: Any) -> bytes:
    return encode_frame(pack({"type": "request", "id": rid, "command": command, **fields}))


def handshaken(limits: Limits | None = None) -> ServerProtocol:
    server = ServerProtocol(schema(), limits)
    [ev] = server.receive_data(request(0, "hello", args={"versions": [1]}))
    assert isinstance(ev, RequestReceived)
    server.send_result(0, hello_result())
    assert server.state is ServerState.READY
    return server


def hello_result() -> dict[str, Any]:
    return {
        "protocol": "1.0",
        "server": {"name": "t", "version": "0", "pid": 1},
        "commands": [],
        "events": [],
        "capabilities": [],
        "limits": {
            "max_frame_size": 1,
            "max_fds_per_request": 1,
            "max_in_flight": 1,
            "max_request_size": 1,
        },
        "connection": 1,
    }


def rejected(events: list[Any]) -> RequestRejected:
    [ev] = events
    assert isinstance(ev, RequestRejected), ev
    return ev


def test_client_and_server_converse() -> None:
    client = ClientProtocol()
    server = ServerProtocol(schema())
    rid, data = client.send_request("hello", {"versions": [1]})
    [ev] = server.receive_data(data)
    assert isinstance(ev, RequestReceived)
    assert ev.args == {"versions": [1], "client": "", "minor": None}
    [reply] = client.receive_data(server.send_result(rid, hello_result()))
    assert reply == Result(rid, hello_result())
    rid, data = client.send_request("query-status")
    [ev] = server.receive_data(data)
    assert isinstance(ev, RequestReceived) and ev.spec.name == "query-status"
    [reply] = client.receive_data(server.send_error(rid, ErrorInfo("internal-error", "x")))
    assert reply == Error(rid, ErrorInfo("internal-error", "x", {}))
    assert client.in_flight == {}


def test_requests_before_hello_are_refused() -> None:
    server = ServerProtocol(schema())
    ev = rejected(server.receive_data(request(1, "query-status")))
    assert (ev.request_id, ev.error.code) == (1, "handshake-required")
    assert server.state is ServerState.HANDSHAKE


def test_second_hello_is_refused() -> None:
    server = handshaken()
    ev = rejected(server.receive_data(request(1, "hello", args={"versions": [1]})))
    assert ev.error.code == "handshake-required"


def test_failed_hello_leaves_handshake_open() -> None:
    server = ServerProtocol(schema())
    server.receive_data(request(0, "hello", args={"versions": [7]}))
    server.send_error(0, ErrorInfo("unsupported-version", "no"))
    assert server.state is ServerState.HANDSHAKE
    [ev] = server.receive_data(request(1, "hello", args={"versions": [1]}))
    assert isinstance(ev, RequestReceived)


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        (encode_frame(b"\xc1"), "invalid-message", None),
        (request(3, "query-status", bogus=1), "invalid-message", 3),
        (request(3, "no-such-thing"), "unknown-command", 3),
        (request(3, "query-status", args={"x": 1}), "invalid-arguments", 3),
        (request(3, "write-to", args={"n": "one"}, fds=["out"]), "invalid-fds", 3),
        (request(3, "write-to", fds=["zzz"]), "invalid-fds", 3),
    ],
)
def test_bad_requests_are_rejected_and_the_connection_carries_on(
    frame: bytes, code: str, rid: int | None
) -> None:
    server = handshaken()
    ev = rejected(server.receive_data(frame))
    assert (ev.request_id, ev.error.code) == (rid, code)
    [ok] = server.receive_data(request(4, "query-status"))
    assert isinstance(ok, RequestReceived)


def test_fds_are_handed_out_by_name_or_discarded() -> None:
    server = handshaken()
    frame = request(5, "write-to", args={"n": 2}, fds=["out"])
    [ev] = server.receive_data(frame, [42])
    assert isinstance(ev, RequestReceived)
    assert ev.fds == {"out": 42}
    assert server.take_discarded_fds() == []
    # wrong kind of arguments: the fd is refused and comes back to be closed
    ev2 = rejected(server.receive_data(request(6, "write-to", args={"n": "x"}, fds=["out"]), [43]))
    assert ev2.error.code == "invalid-arguments"
    assert server.take_discarded_fds() == [43]
    # an fd on a command that takes none
    ev3 = rejected(server.receive_data(request(7, "query-status"), [44]))
    assert ev3.error.code == "invalid-fds"
    assert server.take_discarded_fds() == [44]


def test_too_many_fds_is_limit_exceeded() -> None:
    server = handshaken(Limits(max_fds_per_request=1))
    ev = rejected(server.receive_data(request(5, "write-to", fds=["out"]), [1], fds_truncated=True))
    assert ev.error.code == "limit-exceeded"
    assert ev.error.details == {"limit": "max_fds_per_request", "value": 1}
    assert server.take_discarded_fds() == [1]


def test_duplicate_in_flight_id_and_in_flight_limit() -> None:
    server = handshaken(Limits(max_in_flight=2))
    server.receive_data(request(1, "query-status"))
    ev = rejected(server.receive_data(request(1, "query-status")))
    assert (ev.request_id, ev.error.code) == (None, "invalid-message")
    assert ev.error.details["id"] == 1
    server.receive_data(request(2, "query-status"))
    ev = rejected(server.receive_data(request(3, "query-status")))
    assert (ev.request_id, ev.error.code) == (3, "limit-exceeded")
    status = {"state": "running", "vcpu_count": 1, "memory_size": 1, "stop_reason": None}
    server.send_result(1, {**status, "lease": None, "first": []})
    [ok] = server.receive_data(request(3, "query-status"))
    assert isinstance(ok, RequestReceived)


def test_oversized_frame_breaks_the_connection_and_returns_fds() -> None:
    server = handshaken(Limits(max_frame_size=300))
    [ev] = server.receive_data((301).to_bytes(4, "big") + b"x", [9])
    assert isinstance(ev, ConnectionBroken)
    assert ev.error is not None and ev.error.code == "frame-too-large"
    assert server.state is ServerState.BROKEN
    assert server.take_discarded_fds() == [9]
    assert server.receive_data(b"more", [10]) == []
    assert server.release_fds() == [10]


def test_eof_clean_and_mid_frame() -> None:
    server = handshaken()
    assert server.receive_eof() == [InputEnded()]
    server = handshaken()
    server.receive_data(request(1, "query-status")[:3], [5])
    assert server.receive_eof() == [ConnectionBroken(None)]
    assert server.take_discarded_fds() == [5]


def test_results_are_checked_against_the_schema() -> None:
    server = handshaken()
    server.receive_data(request(1, "query-status"))
    with pytest.raises(LocalProtocolError, match="does not match its schema"):
        server.send_result(1, {"state": "running"})
    assert 1 in server.in_flight  # still answerable with an error
    server.send_error(1, ErrorInfo("internal-error", "bad result"))
    assert server.in_flight == frozenset()


def test_events_are_checked_against_the_schema() -> None:
    server = handshaken()
    client = ClientProtocol()
    data = server.send_event(
        "state-change", {"old": "running", "new": "paused", "reason": None}, 12.5
    )
    [ev] = client.receive_data(data)
    assert ev.event == "state-change" and ev.time == 12.5  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        server.send_event("state-change", {"old": "running"}, 0)
    with pytest.raises(LocalProtocolError):
        server.send_event("no-such-event", {}, 0)


def test_client_refuses_replies_to_unknown_ids() -> None:
    client = ClientProtocol()
    server = handshaken()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(server.send_error(99, ErrorInfo("x", "y")))


def test_client_accepts_connection_errors_with_null_id() -> None:
    client = ClientProtocol()
    server = ServerProtocol(schema())
    [ev] = client.receive_data(server.send_connection_error(ErrorInfo("access-denied", "no")))
    assert ev == Error(None, ErrorInfo("access-denied", "no", {}))


# --- hostile input: bounded replies, bounded fds, bounded decoding --------------------

#: limits that let a huge request through to the checks that used to echo it
WIDE_OPEN = Limits(max_request_size=1 << 20, request_decode=DecodeLimits())
BIG = 600_000


@pytest.mark.parametrize(
    ("message", "fds", "code"),
    [
        ({"type": "t" * BIG, "id": 1}, 0, "invalid-message"),
        ({"type": "request", "id": 1, "command": "x", "k" * BIG: 1}, 0, "invalid-message"),
        ({"type": "request", "id": "i" * BIG, "command": "x"}, 0, "invalid-message"),
        ({"type": "request", "id": [[1] * 9] * (BIG // 10), "command": "x"}, 0, "invalid-message"),
        ({"type": "request", "id": 1, "command": "c" * BIG}, 0, "unknown-command"),
        ({"type": "request", "id": 1, "command": "write-to", "args": {"a" * BIG: 1}}, 1,
         "invalid-fds"),
        ({"type": "request", "id": 1, "command": "write-to", "fds": ["out"],
          "args": {"a" * BIG: 1}}, 1, "invalid-arguments"),
        ({"type": "request", "id": 1, "command": "dump-memory", "fds": ["out"],
          "args": {"format": "f" * BIG}}, 1, "invalid-arguments"),
        ({"type": "request", "id": 1, "command": "write-to", "fds": ["o" * BIG]}, 1,
         "invalid-fds"),
        ({"type": "request", "id": 1, "command": "write-to", "fds": ["out", "out"]}, 2,
         "invalid-fds"),
    ],
)  # fmt: skip
def test_an_error_reply_never_echoes_much_of_the_request(
    message: dict[str, Any], fds: int, code: str
) -> None:
    server = handshaken(WIDE_OPEN)
    frame = encode_frame(pack(message), 1 << 21)
    [ev] = server.receive_data(frame, list(range(100, 100 + fds)))
    assert isinstance(ev, RequestRejected)
    assert ev.error.code == code, ev.error
    reply = server.send_error(ev.request_id, ev.error)
    assert len(reply) < 1024, f"a {len(reply)}-byte reply to a {len(frame)}-byte request"


def test_sending_an_error_cannot_fail() -> None:
    server = handshaken()
    [ev] = server.receive_data(request(3, "query-status"))
    assert isinstance(ev, RequestReceived)
    huge = ErrorInfo(
        "io-error", "m" * (2 << 20), {"limit": 4, "note": "n" * 5000, "list": list(range(10**5))}
    )
    unencodable = ErrorInfo("io-error", "fine", {"what": {1, 2}, "limit": 4})
    for error, rid in [(huge, 3), (unencodable, None), (huge, None)]:
        reply = server.send_error(rid, error)
        assert len(reply) <= 4 + MAX_ERROR_SIZE
        client = ClientProtocol()
        client._in_flight[3] = "query-status"
        [msg] = client.receive_data(reply)
        assert isinstance(msg, Error) and msg.id == rid
        # cut down: the code, the start of the message, the short plain details
        assert msg.error.code == "io-error"
        assert msg.error.details == {"limit": 4}
        assert msg.error.message.startswith(error.message[:50])
    assert server.in_flight == frozenset()
    # even a frame limit too small for any error gets one (the peer may refuse it)
    tiny = ServerProtocol(schema(), Limits(max_frame_size=10))
    last = ClientProtocol().receive_data(tiny.send_error(None, huge))
    assert last == [
        Error(None, ErrorInfo("io-error", "the server could not send this error in full"))
    ]


def test_a_request_is_decoded_within_structural_bounds() -> None:
    server = handshaken()
    # larger than any request can be: refused from the header, nothing buffered
    [ev] = server.receive_data((DEFAULT_MAX_REQUEST_SIZE + 1).to_bytes(4, "big") + b"\x90")
    assert isinstance(ev, ConnectionBroken) and ev.error is not None
    assert ev.error.code == "frame-too-large"
    assert ev.error.details == {"size": DEFAULT_MAX_REQUEST_SIZE + 1, "limit": 4096}
    # a request-sized frame that is one huge array: refused from the array's header
    server = handshaken()
    n = DEFAULT_MAX_REQUEST_SIZE - 5
    flat = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    ev2 = rejected(server.receive_data(encode_frame(flat)))
    assert ev2.error.code == "invalid-message"
    assert "exceeds max_array_len(64)" in ev2.error.message
    # so are too many arguments, too long a string, an extension type
    for bad in (
        {"type": "request", "id": 1, "command": "hello", "args": {"versions": [1] * 65}},
        {"type": "request", "id": 1, "command": "h" * 1025},
        {"type": "request", "id": 1, "command": "hello", "args": {"x": msgpack.ExtType(1, b"x")}},
    ):
        assert rejected(server.receive_data(encode_frame(pack(bad)))).error.code == (
            "invalid-message"
        )
    # the replies (and the client's decoder) keep the full frame size
    assert server.limits.max_frame_size == 1 << 20


def test_next_event_decodes_one_frame_at_a_time() -> None:
    server = handshaken()
    server.feed(request(1, "query-status") + request(2, "query-status") + request(3, "q")[:5])
    first, second = server.next_event(), server.next_event()
    assert isinstance(first, RequestReceived) and first.request.id == 1
    assert isinstance(second, RequestReceived) and second.request.id == 2
    assert server.next_event() is None


def test_fds_trickling_in_with_an_unfinished_frame_break_the_connection() -> None:
    server = handshaken(Limits(max_fds_per_request=2))
    frame = request(5, "write-to", fds=["out"])
    assert server.receive_data(frame[:3], [10]) == []  # its own fd, with its first byte
    assert server.receive_data(frame[3:4], [11]) == []  # a stray one: still within the limit
    [ev] = server.receive_data(frame[4:5], [12, 13])
    assert isinstance(ev, ConnectionBroken) and ev.error is not None
    assert ev.error.code == "too-many-fds"
    assert ev.error.details == {"fds": 4, "limit": 2}
    assert sorted(server.take_discarded_fds()) == [10, 11, 12, 13]
    assert server.receive_data(frame[5:], [15]) == []
    assert server.release_fds() == [15]
