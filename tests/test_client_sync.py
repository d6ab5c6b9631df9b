"""The blocking client, against a server running in a thread."""

from __future__ import annotations

import os
import time

import pytest

from tests.control_support import RecordingMachine, serving, short_tmpdir
from vmipc.client import ClosedByPeer, ClosedByUs, CommandError, SyncClient
from vmipc.protocol import load_schema
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
