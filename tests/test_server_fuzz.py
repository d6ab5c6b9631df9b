"""Property-based tests: random and mutated frames thrown at a live server.

After every example: the server still answers another client, the machine was not touched,
every error the server sent is documented in the schema, and no fd is left open.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.control_support import (
    RawConnection,
    Served,
    describe_fds,
    schema_with_test_commands,
    serving,
    wait_for_fds,
)
from vmipc.protocol import Error, Event, Result, encode_frame, pack
from vmipc.server import ServerConfig
from vmipc.vmm.runstate import RunState

MAX_FRAME = 4096
DOCUMENTED = set(schema_with_test_commands().errors)
#: commands that cannot change the machine or block: the fuzzer builds requests for these
COMMANDS = ["hello", "query-status", "query-commands", "subscribe", "cancel", "test-write"]
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, int]]:
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # an fd that never blocks
    try:
        config = ServerConfig(max_frame_size=MAX_FRAME, max_fds_per_request=2, max_in_flight=4)
        with serving(config) as s:
            yield s, devnull
    finally:
        os.close(devnull)


def check_after_example(s: Served) -> None:
    s.wait_connections(0)
    leaked = wait_for_fds(s.baseline)
    assert not leaked, f"fds leaked: {describe_fds(leaked)}"
    assert s.machine.calls == []
    assert s.machine.state is RunState.RUNNING
    with s.connect() as c:
        assert c.result(c.request("query-status"))["state"] == "running"
    s.wait_connections(0)


def converse(s: Served, chunks: list[tuple[bytes, bool]], devnull: int, hello: bool) -> None:
    """Send ``chunks`` (with an fd when flagged), half-close, read all; check what came."""
    with RawConnection(s.path, timeout=10) as c:
        if hello:
            c.hello()
        try:
            for data, with_fd in chunks:
                if data:
                    c.send_raw(data, [devnull, devnull] if with_fd else None)
            c.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first (a framing error): fine
        got = c.wait_closed()
    for message in got:
        assert isinstance(message, Result | Error | Event)
        if isinstance(message, Error):
            assert message.error.code in DOCUMENTED, message


# --- strategies -----------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": draw(st.sampled_from(["request", "request", "request", "result", "bogus"])),
        "id": draw(st.one_of(st.integers(0, 5), st.integers(-3, 2**64 - 1), values)),
        "command": draw(st.one_of(st.sampled_from(COMMANDS), st.text(max_size=12), values)),
    }
    if draw(st.booleans()):
        message["args"] = draw(
            st.one_of(
                st.fixed_dictionaries({"versions": st.lists(st.integers(-1, 3), max_size=3)}),
                st.fixed_dictionaries({"events": st.lists(st.text(max_size=12), max_size=3)}),
                st.fixed_dictionaries({"request": st.integers(-1, 10)}),
                st.fixed_dictionaries({"data": st.binary(max_size=16)}),
                st.dictionaries(st.text(max_size=8), values, max_size=3),
                values,
            )
        )
    if draw(st.booleans()):
        message["fds"] = draw(
            st.one_of(st.lists(st.sampled_from(["out", "in", "x"]), max_size=3), values)
        )
    for key in draw(st.lists(st.sampled_from(["type", "id", "command"]), max_size=1)):
        del message[key]
    return message


def frames_of(messages: list[Any]) -> bytes:
    return b"".join(encode_frame(pack(m), 1 << 30) for m in messages)


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    data = bytearray(frames_of(draw(st.lists(requests(), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:  # rewrite a length header somewhere
            data[at : at + 4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    return bytes(data)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


# --- properties -----------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600), hello=st.booleans(), with_fd=st.booleans())
def test_random_bytes(served: tuple[Served, int], data: bytes, hello: bool, with_fd: bool) -> None:
    s, devnull = served
    converse(s, [(data, with_fd)], devnull, hello)
    check_after_example(s)


@FUZZ
@given(
    stream=mutated_stream(),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    fd_flags=st.lists(st.booleans(), min_size=5, max_size=5),
    hello=st.booleans(),
)
def test_mutated_frames(
    served: tuple[Served, int], stream: bytes, cuts: list[int], fd_flags: list[bool], hello: bool
) -> None:
    s, devnull = served
    pieces = split(stream, cuts)
    converse(s, list(zip(pieces, fd_flags, strict=False)), devnull, hello)
    check_after_example(s)


@FUZZ
@given(messages=st.lists(st.one_of(requests(), values), min_size=1, max_size=5))
def test_well_framed_garbage_gets_one_answer_each_and_the_connection_lives(
    served: tuple[Served, int], messages: list[Any]
) -> None:
    s, _ = served
    payloads = [pack(m) for m in messages]
    if any(len(p) > MAX_FRAME for p in payloads):
        return
    probe_id = 7_777_777
    assume(all(not isinstance(m, dict) or m.get("id") != probe_id for m in messages))
    with s.connect() as c:
        for payload in payloads:
            c.send_raw(encode_frame(payload))
        c.send({"type": "request", "id": probe_id, "command": "query-status"})
        # exactly one answer (a result, or an error with the id or null) per frame, and the
        # connection carries on: the probe behind them is answered normally
        replies: list[Result | Error] = []
        probe: Result | Error | None = None
        while probe is None or len(replies) < len(payloads) + 1:
            message = c.next_message()
            if isinstance(message, Event):
                continue
            replies.append(message)
            if message.id == probe_id:
                probe = message
            if isinstance(message, Error):
                assert message.error.code in DOCUMENTED, message
        assert len(replies) == len(payloads) + 1
        assert isinstance(probe, Result) and probe.result["state"] == "running"
    check_after_example(s)
