"""The blocking client, against a server running in a thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

from tests.control_support import RecordingMachine, serving, short_tmpdir
from vmipc.client import ClosedByPeer, ClosedByUs, CommandError, HelloResult, SyncClient
from vmipc.protocol import Error, ErrorInfo, encode_frame, encode_message, load_schema
from vmipc.server import ServerConfig


def test_methods_and_call() -> None:
    with serving() as s, SyncClient(s.path) as client:
        assert client.protocol_version == load_schema().version
        assert client.query_status()["vcpu_count"] == 2
        assert client.pause() == {}
        assert client.call("query-status")["state"] == "paused"
        client.resume()
        with pytest.raises(CommandError) as info:
            client.resume()
        assert (info.value.code, info.value.command) == ("invalid-state", "resume")
        assert s.machine.calls == ["pause", "resume"]  # the refusal never reached it


def test_fds_events_and_progress() -> None:
    r, w = os.pipe()
    try:
        with serving() as s, SyncClient(s.path, events=["state-change", "progress"]) as client:
            assert client.call("test-write", fds={"out": w}, data=b"abc") == {"written": 3}
            client.pause()
            assert client.next_event().data["new"] == "paused"
            seen = []
            client.call("test-sleep", seconds=0.1, on_progress=seen.append)
            assert seen[-1].data["done"] == 20
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)


def test_a_progress_observer_takes_the_progress_no_call_takes_and_other_events_stay() -> None:
    """As the async client's: every ``progress`` event of a call without its own
    ``on_progress`` goes to the observers (and is not kept for next_event); other events
    are kept; a failing observer is logged and dropped; removed, it sees nothing more."""
    with serving() as s, SyncClient(s.path, events=["state-change", "progress"]) as client:
        seen: list[Any] = []
        remove = client.add_progress_observer(seen.append)
        remove_failing = client.add_progress_observer(lambda event: 1 / 0)
        client.call("test-sleep", seconds=0.1)
        assert seen and seen[-1].data["done"] == 20
        assert all(event.event == "progress" for event in seen)
        observed = len(seen)
        own: list[Any] = []
        client.call("test-sleep", seconds=0.05, on_progress=own.append)
        assert own and len(seen) == observed  # the call's own callback took them
        client.pause()
        assert client.next_event().data["new"] == "paused"  # kept, not observed
        remove()
        remove_failing()
        client.call("test-sleep", seconds=0.05)
        assert len(seen) == observed
        assert client.next_event().event == "progress"  # kept again once removed


def test_timeout_raises_and_closes() -> None:
    with serving() as s, SyncClient(s.path, timeout=0.1) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            client.call("test-sleep", seconds=2)
        assert time.monotonic() - start < 1
        with pytest.raises(ClosedByUs):
            client.query_status()


def test_refused_connection_says_why() -> None:
    with serving(ServerConfig(max_connections=1)) as s, SyncClient(s.path):
        with pytest.raises(ClosedByPeer) as info:
            SyncClient(s.path)
        assert info.value.error is not None
        assert info.value.error.code == "too-many-connections"


def test_quit_then_closed_by_peer() -> None:
    machine = RecordingMachine()
    with serving(machine=machine) as s:
        with SyncClient(s.path) as client:
            client.quit()
            # a request racing the shutdown is refused, or finds the connection closed
            with pytest.raises((CommandError, ClosedByPeer)) as info:
                client.query_status()
                client.query_status()
            if isinstance(info.value, CommandError):
                assert info.value.code == "shutting-down"
            else:
                assert info.value.error is not None
                assert info.value.error.code == "shutting-down"
        assert s.thread.join(5)
    assert machine.calls == ["close"]


def test_no_server() -> None:
    with short_tmpdir() as tmp, pytest.raises(FileNotFoundError):
        SyncClient(os.path.join(tmp, "none.sock"))


def test_refused_by_the_real_server_says_why_every_time() -> None:
    with serving(ServerConfig(max_connections=1)) as s, SyncClient(s.path) as first:
        for _ in range(50):
            with pytest.raises(ClosedByPeer) as info:
                SyncClient(s.path, timeout=2, client_name="one too many")
            assert info.value.error is not None, info.value
            assert info.value.error.code == "too-many-connections"
        assert first.query_status()["state"] == "running"


@pytest.mark.parametrize("timeout", [None, 2.0])
@pytest.mark.parametrize("speaks", ["then-closes", "after-it-stops-reading"])
def test_a_refusal_that_makes_the_hello_fail_still_says_why(
    speaks: str, timeout: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses before the client's ``hello`` goes out (the hello is held back
    until then), so that send fails with EPIPE: the client reads what the server said,
    in its receive buffer already (then-closes) or coming a moment after the failed send
    (after-it-stops-reading: shutdown SHUT_RD, then the error, then close), whether the
    client has a timeout or blocks for ever."""
    refused = threading.Event()
    hello_arrived: list[bytes] = []
    original_hello = SyncClient.hello

    def held_hello(self: SyncClient, **args: Any) -> HelloResult:
        assert refused.wait(2)
        return original_hello(self, **args)

    monkeypatch.setattr(SyncClient, "hello", held_hello)
    frame = encode_frame(encode_message(Error(None, ErrorInfo("access-denied", "go away"))))

    def unread(sock: socket.socket) -> bytes:
        try:
            return sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""

    def fake_server(listener: socket.socket) -> None:
        sock, _ = listener.accept()
        if speaks == "then-closes":
            with sock:
                sock.sendall(frame)
                hello_arrived.append(unread(sock))
            refused.set()
        else:
            with sock:
                sock.shutdown(socket.SHUT_RD)
                refused.set()
                time.sleep(0.05)
                sock.sendall(frame)
                hello_arrived.append(unread(sock))

    with short_tmpdir() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = os.path.join(tmp, "fake.sock")
        listener.bind(path)
        listener.listen(1)
        server = threading.Thread(target=fake_server, args=(listener,))
        server.start()
        try:
            start = time.monotonic()
            with pytest.raises(ClosedByPeer) as info:
                SyncClient(path, timeout=timeout)
            assert time.monotonic() - start < 1
        finally:
            server.join(5)
    assert info.value.error is not None, info.value
    assert info.value.error.code == "access-denied"
    assert "sending failed" in str(info.value)
    assert hello_arrived == [b""]
