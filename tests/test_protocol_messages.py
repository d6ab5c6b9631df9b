"""Message encoding and strict shape checks."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import pytest

from vmipc.protocol import (
    MAX_ID,
    Error,
    ErrorInfo,
    Event,
    RemoteProtocolError,
    Request,
    Result,
    decode_message,
    encode_message,
)


@pytest.mark.parametrize(
    "message",
    [
        Request(0, "query-status"),
        Request(MAX_ID, "x", {"a": 1, "b": [b"\x00", None]}, ("out", "in")),
        Result(3, {"state": "running"}),
        Result(4, None),
        Error(5, ErrorInfo("invalid-state", "cannot resume while running", {"state": "running"})),
        Error(None, ErrorInfo("frame-too-large", "too big")),
        Event("state-change", 1.5, {"old": "running", "new": "paused", "reason": None}),
    ],
)
def test_round_trip(message: object) -> None:
    assert decode_message(encode_message(message)) == message  # type: ignore[arg-type]


def raw(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("payload", "problem", "echoed_id"),
    [
        (b"", "not one valid msgpack", None),
        (b"\xc1", "not one valid msgpack", None),
        (raw(1) + raw(2), "not one valid msgpack", None),
        (raw([1, 2]), "must be a map", None),
        (raw({1: 2}), "not one valid msgpack", None),  # non-str keys refused by the decoder
        (raw({"type": "nope", "id": 4}), "unknown message type", 4),
        (raw({"type": "request", "id": 4}), "missing command", 4),
        (raw({"type": "request", "id": 4, "command": "x", "extra": 1}), "unknown keys", 4),
        (raw({"type": "request", "id": -1, "command": "x"}), "request id", None),
        (raw({"type": "request", "id": True, "command": "x"}), "request id", None),
        (raw({"type": "request", "id": 2**53, "command": "x"}), "request id", None),
        (raw({"type": "request", "id": 1, "command": ""}), "non-empty string", 1),
        (raw({"type": "request", "id": 1, "command": "x", "args": []}), "args must be", 1),
        (raw({"type": "request", "id": 1, "command": "x", "fds": [1]}), "fds must be", 1),
        (raw({"type": "request", "id": 1, "command": "x", "fds": "out"}), "fds must be", 1),
    ],
)
def test_bad_shapes_are_invalid_message(
    payload: bytes, problem: str, echoed_id: int | None
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(payload)
    assert info.value.code == "invalid-message"
    assert problem in info.value.message
    assert info.value.details.get("id") == echoed_id


def test_allowed_types_are_enforced() -> None:
    payload = encode_message(Result(1, 2))
    with pytest.raises(RemoteProtocolError, match="not expected"):
        decode_message(payload, allowed=frozenset({"request"}))
