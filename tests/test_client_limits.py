"""The clients against a hostile server: they keep their own limits.

A server may announce any ``max_frame_size`` in ``hello`` and send anything at all; the
clients never accept a frame over their own limit (1 MiB unless told otherwise), refuse a
``hello`` whose limits make no sense, and keep neither events they did not subscribe to
nor more than a bounded amount of those they did. The fake servers here are plain
sockets in a thread; ``vmipc call`` runs in a subprocess whose peak RSS is measured."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from tests.control_support import short_tmpdir
from vmipc.client import SyncClient, open_client
from vmipc.client._common import EVENT_BUFFER_BYTES
from vmipc.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClosedByUs,
    FrameDecoder,
    RemoteProtocolError,
    Request,
    decode_message,
    encode_frame,
    pack,
)

VMIPC = [sys.executable, "-m", "vmipc"]
MiB = 1 << 20

#: what the fake server answers to one request: the bytes to send
Responder = Callable[[Request], bytes]


def hello_result(max_frame_size: Any) -> dict[str, Any]:
    return {
        "protocol": "1.6",
        "server": {"name": "hostile", "version": "0", "pid": 1},
        "commands": ["hello", "query-commands", "query-status", "subscribe"],
        "events": ["state-change", "progress"],
        "capabilities": [],
        "limits": {
            "max_frame_size": max_frame_size,
            "max_fds_per_request": 8,
            "max_in_flight": 32,
        },
    }


def result_frame(rid: int, result: Any) -> bytes:
    return encode_frame(pack({"type": "result", "id": rid, "result": result}), 1 << 30)


def raw_result_frame(rid: int, result: bytes) -> bytes:
    """A result frame whose ``result`` is ``result``, already msgpack (any size)."""
    payload = b"\x83\xa4type\xa6result\xa2id" + pack(rid) + b"\xa6result" + result
    return len(payload).to_bytes(4, "big") + payload


def empty_maps(size: int) -> bytes:
    """About ``size`` bytes of msgpack that decode to as many empty maps: the most
    objects a byte can buy."""
    return b"\xdd" + size.to_bytes(4, "big") + b"\x80" * size


def event_frame(name: str, data: dict[str, Any]) -> bytes:
    return encode_frame(pack({"type": "event", "event": name, "time": 0.0, "data": data}), 1 << 30)


def answer(max_frame_size: Any, other: Responder) -> Responder:
    def respond(request: Request) -> bytes:
        if request.command == "hello":
            return result_frame(request.id, hello_result(max_frame_size))
        return other(request)

    return respond


@contextlib.contextmanager
def hostile_server(respond: Responder) -> Iterator[str]:
    """A fake server at the yielded path: every connection's requests are answered by
    ``respond``, until the client goes away."""
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "hostile.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(path)
        listener.listen()
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve_one(conn: socket.socket) -> None:
            decoder = FrameDecoder(1 << 30, 0)
            with conn, contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        message = decode_message(frame.payload, allowed=frozenset({"request"}))
                        assert isinstance(message, Request)
                        conn.sendall(respond(message))

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(30)
                serve_one(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield path
        finally:
            stop.set()
            thread.join(30)
            listener.close()


#: runs ``vmipc ARGS...`` and, on the way out, writes the process's VmHWM (its peak RSS,
#: in kB) to the file named first. Not ``wait4``'s ru_maxrss: that counts the memory of
#: the (v)forking parent, pytest, which the child shares until its exec.
_MEASURED = """
import atexit, runpy, sys
out = sys.argv[1]
def report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(hwm)
atexit.register(report)
sys.argv = ["vmipc", *sys.argv[2:]]
runpy.run_module("vmipc", run_name="__main__")
"""


def peak_rss_of_vmipc_call(path: str) -> tuple[int, str, int]:
    """Run ``vmipc call query-status`` against ``path``: (exit code, stderr, peak RSS in
    bytes)."""
    with short_tmpdir() as tmp:
        hwm = os.path.join(tmp, "hwm")
        argv = [sys.executable, "-c", _MEASURED, hwm, "call", "--socket", path]
        argv += ["--timeout", "60", "query-status"]
        done = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120
        )
        with open(hwm) as f:
            return done.returncode, done.stderr, int(f.read()) * 1024


def test_vmipc_call_does_not_adopt_a_hostile_frame_limit() -> None:
    # the server announces 1 GiB, then answers the catalogue with 8 MiB of empty maps
    def small(request: Request) -> bytes:
        return raw_result_frame(request.id, empty_maps(64 * 1024))

    def huge(request: Request) -> bytes:
        return raw_result_frame(request.id, empty_maps(8 * MiB))

    with hostile_server(answer(1 << 30, small)) as path:
        code, _, baseline = peak_rss_of_vmipc_call(path)
    assert code == 3  # the "catalogue" is no catalogue
    with hostile_server(answer(1 << 30, huge)) as path:
        code, err, peak = peak_rss_of_vmipc_call(path)
    # before: 8 MiB of empty maps decoded to some 600 MB
    assert peak < baseline + 32 * MiB, (peak >> 20, baseline >> 20)
    assert code == 3
    assert err.count("\n") == 1 and "frame-too-large" in err, err


def test_a_reply_of_a_million_objects_within_the_frame_limit_is_refused_cheaply() -> None:
    # a legal 1 MiB frame (the client's own limit) holding a million empty maps
    def small(request: Request) -> bytes:
        return raw_result_frame(request.id, empty_maps(64 * 1024))

    def dense(request: Request) -> bytes:
        return raw_result_frame(request.id, empty_maps(MiB - 64))

    with hostile_server(answer(MiB, small)) as path:
        _, _, baseline = peak_rss_of_vmipc_call(path)
    with hostile_server(answer(MiB, dense)) as path:
        code, err, peak = peak_rss_of_vmipc_call(path)
    # before: the reply decoded into ~70 MiB of dicts
    assert peak < baseline + 16 * MiB, (peak >> 20, baseline >> 20)
    assert code == 3
    assert err.count("\n") == 1 and "decoding limit" in err, err


def test_vmipc_call_keeps_no_events_it_did_not_subscribe_to() -> None:
    # 256 unasked-for events of 1 MiB each, then a reply
    def flood(request: Request) -> bytes:
        blob = b"\xa5" * (MiB - 200)
        events = event_frame("state-change", {"junk": blob}) * 256
        return events + raw_result_frame(request.id, empty_maps(16))

    with hostile_server(answer(DEFAULT_MAX_FRAME_SIZE, flood)) as path:
        code, err, peak = peak_rss_of_vmipc_call(path)
    assert code == 3, err
    # before: every event was kept, 256 MiB
    assert peak < 100 * MiB, peak >> 20


def two_mib_reply(request: Request) -> bytes:
    return result_frame(request.id, {"state": "running", "pad": b"\0" * (2 * MiB)})


def test_sync_client_keeps_its_own_frame_limit() -> None:
    with hostile_server(answer(1 << 30, two_mib_reply)) as path:
        with SyncClient(path, timeout=30) as client, pytest.raises(RemoteProtocolError) as info:
            client.query_status()
        assert info.value.code == "frame-too-large"
        assert info.value.details["limit"] == DEFAULT_MAX_FRAME_SIZE
        # a client that wants more says so
        with SyncClient(path, timeout=30, max_frame_size=4 * MiB) as client:
            assert client.query_status()["state"] == "running"


async def test_async_client_keeps_its_own_frame_limit() -> None:
    with hostile_server(answer(1 << 30, two_mib_reply)) as path:
        async with open_client(path) as client:
            with pytest.raises(ClosedByUs, match=r"frame-too-large: .* the limit is 1048576"):
                await client.query_status()
            assert client.is_closed
        async with open_client(path, max_frame_size=4 * MiB) as client:
            assert (await client.query_status())["state"] == "running"


@pytest.mark.parametrize("announced", ["1024", None, 0, -1, 2.5, True])
def test_a_hello_with_nonsense_limits_is_a_protocol_error(announced: Any) -> None:
    with (
        hostile_server(answer(announced, two_mib_reply)) as path,
        pytest.raises(RemoteProtocolError, match="max_frame_size"),
    ):
        SyncClient(path, timeout=30)


async def test_async_hello_with_nonsense_limits_is_a_protocol_error() -> None:
    with (
        hostile_server(answer("1024", two_mib_reply)) as path,
        pytest.raises(RemoteProtocolError, match="max_frame_size"),
    ):
        async with open_client(path):
            pass


def test_a_smaller_announced_limit_is_adopted() -> None:
    with hostile_server(answer(4096, two_mib_reply)) as path, SyncClient(path) as client:
        with pytest.raises(RemoteProtocolError) as info:
            client.query_status()
        assert info.value.details["limit"] == 4096


async def test_subscribed_events_are_kept_up_to_a_byte_budget() -> None:
    count = 2 * EVENT_BUFFER_BYTES // MiB  # twice what the buffer holds

    def respond(request: Request) -> bytes:
        if request.command != "subscribe":
            return result_frame(request.id, {"state": "running"})
        out = result_frame(request.id, {"events": ["state-change"]})
        for i in range(count):
            out += event_frame("state-change", {"i": i, "junk": b"\0" * (MiB - 100)})
        # and one small event it did not subscribe to, which is dropped
        return out + event_frame("progress", {"request": 5}) + event_frame("state-change", {})

    with hostile_server(answer(DEFAULT_MAX_FRAME_SIZE, respond)) as path:
        with SyncClient(path, timeout=30, events=["state-change"]) as client:
            client.query_status()  # every event has arrived by its reply
            kept = []
            while (event := client.next_event()).data:
                kept.append(event.data["i"])
        check_kept(kept, count)
        async with open_client(path, events=["state-change"]) as aclient:
            await aclient.query_status()
            kept = []
            with trio.fail_after(30):
                while (event := await aclient.next_event()).data:
                    kept.append(event.data["i"])
        check_kept(kept, count)


def check_kept(kept: list[int], count: int) -> None:
    """The newest events, in order, as many as the budget holds (about half)."""
    assert 0 < len(kept) <= EVENT_BUFFER_BYTES // MiB + 1, len(kept)
    assert kept == list(range(count - len(kept), count))
