"""The async client against a server in the same trio loop."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from tests.control_support import RecordingMachine, make_server, short_tmpdir
from vmipc.client import (
    Client,
    ClosedByPeer,
    ClosedByUs,
    CommandError,
    Event,
    open_client,
)
from vmipc.protocol import (
    Error,
    ErrorInfo,
    FrameDecoder,
    Request,
    Result,
    decode_message,
    encode_frame,
    encode_message,
    load_schema,
)
from vmipc.server import Server, ServerConfig
from vmipc.vmm.runstate import RunState


@dataclass
class Running:
    machine: RecordingMachine
    server: Server
    path: str


@pytest.fixture
async def running(nursery: trio.Nursery) -> AsyncIterator[Running]:
    with short_tmpdir() as tmp:
        machine = RecordingMachine()
        server = make_server(machine, ServerConfig(max_connections=3))
        path = await nursery.start(server.serve, os.path.join(tmp, "vm.sock"))
        yield Running(machine, server, path)


async def test_typed_methods(running: Running) -> None:
    async with open_client(running.path) as client:
        assert client.protocol_version == load_schema().version
        assert client.server_info["server"]["pid"] == os.getpid()
        status = await client.query_status()
        assert status == {
            "state": "running",
            "vcpu_count": 2,
            "memory_size": 64 << 20,
            "stop_reason": None,
            "lease": None,
            "first": [],
        }
        assert await client.pause() == {}
        assert (await client.query_status())["state"] == "paused"
        assert await client.resume() == {}
        assert running.machine.calls == ["pause", "resume"]


async def test_call_by_name_and_command_errors(running: Running) -> None:
    async with open_client(running.path) as client:
        assert (await client.call("query-status"))["state"] == "running"
        with pytest.raises(CommandError) as info:
            await client.call("resume")
        assert info.value.code == "invalid-state"
        assert info.value.command == "resume"
        assert info.value.details == {"state": "running", "allowed": ["paused"]}
        assert str(info.value) == "invalid-state: cannot resume while running"
        with pytest.raises(CommandError) as info:
            await client.call("no-such-command")
        assert info.value.code == "unknown-command"
        with pytest.raises(CommandError) as info:
            await client.call("test-sleep", seconds="soon")
        assert info.value.code == "invalid-arguments"


async def test_fds_by_number_or_file_object(running: Running) -> None:
    r, w = os.pipe()
    try:
        async with open_client(running.path) as client:
            assert await client.call("test-write", fds={"out": w}, data=b"one ") == {"written": 4}
            with os.fdopen(os.dup(w), "wb") as f:
                await client.call("test-write", fds={"out": f}, data=b"two")
        assert os.read(r, 100) == b"one two"
    finally:
        os.close(r)
        os.close(w)


async def test_events_and_progress(running: Running) -> None:
    async with (
        open_client(running.path, events=["state-change"]) as watcher,
        open_client(running.path) as actor,
    ):
        await actor.pause()
        event = await watcher.next_event()
        assert isinstance(event, Event)
        assert event.data["new"] == "paused"
        await actor.resume()
        async for event in watcher.events():
            assert event.data["new"] == "running"
            break
        await actor.subscribe(events=["progress"])
        seen: list[Event] = []
        assert await actor.call("test-sleep", seconds=0.2, on_progress=seen.append) == {
            "slept": 0.2
        }
        assert seen and seen[-1].data["done"] == seen[-1].data["total"] == 20


async def test_concurrent_calls_on_one_connection(running: Running) -> None:
    async with open_client(running.path) as client:
        results: list[object] = []

        async def one(i: int) -> None:
            results.append(await client.call("test-sleep", seconds=0.05 * (i % 3)))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert len(results) == 20


async def test_cancelling_a_call_cancels_the_request_on_the_server(running: Running) -> None:
    async with open_client(running.path) as client:
        with trio.move_on_after(0.1) as scope:
            await client.call("test-sleep", seconds=30)
        assert scope.cancelled_caught
        # the server got `cancel` and dropped the request: nothing is left in flight
        (conn,) = running.server._connections
        with trio.fail_after(2):
            while conn._requests:
                await trio.sleep(0.01)
        assert (await client.query_status())["state"] == "running"


async def test_closed_by_peer_after_quit_says_why(running: Running) -> None:
    async with open_client(running.path) as client, open_client(running.path) as other:
        await client.quit()
        with pytest.raises(ClosedByPeer) as info:
            await other.next_event()
        assert info.value.error is not None
        assert info.value.error.code == "shutting-down"
        with pytest.raises(ClosedByPeer):
            await other.query_status()
    with trio.fail_after(3):  # serve() closes the machine once the connections are gone
        while running.machine.state is not RunState.DESTROYED:
            await trio.sleep(0.01)


async def test_closed_by_us(running: Running) -> None:
    async with open_client(running.path) as client:
        await client.aclose()
        assert client.is_closed
        with pytest.raises(ClosedByUs):
            await client.query_status()


async def test_refused_connection_raises_closed_by_peer_with_the_reason(
    running: Running,
) -> None:
    async with open_client(running.path), open_client(running.path), open_client(running.path):
        with pytest.raises(ClosedByPeer) as info:
            async with open_client(running.path):
                pass
        assert info.value.error is not None
        assert info.value.error.code == "too-many-connections"


async def test_no_server_is_an_os_error() -> None:
    with short_tmpdir() as tmp, pytest.raises(FileNotFoundError):
        async with open_client(os.path.join(tmp, "nothing.sock")):
            pass


async def test_an_answer_that_arrives_with_the_close_is_kept() -> None:
    """A server that answers ``quit`` and closes at once: the reply, the connection-level
    error and the EOF can arrive before the caller wakes up; the caller gets the reply."""
    schema = load_schema()
    rounds = 30
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "fake.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)

        async def fake_server() -> None:
            for _ in range(rounds):
                await fake_connection()

        async def fake_connection() -> None:
            sock, _ = await listener.accept()
            decoder = FrameDecoder()
            answered = 0
            with sock:
                while answered < 2:
                    decoder.feed(await sock.recv(65536))
                    while (frame := decoder.next_frame()) is not None:
                        request = decode_message(frame.payload, allowed=frozenset({"request"}))
                        assert isinstance(request, Request)
                        rid = request.id
                        if answered == 0:  # hello
                            result = {
                                "protocol": schema.version,
                                "server": {"name": "fake", "version": "0", "pid": 1},
                                "commands": sorted(schema.commands),
                                "events": [],
                                "capabilities": [],
                                "limits": {
                                    "max_frame_size": 1 << 20,
                                    "max_fds_per_request": 8,
                                    "max_in_flight": 8,
                                },
                            }
                            await sock.send(encode_frame(encode_message(Result(rid, result))))
                        else:  # quit: reply, last words and close in one piece
                            last_words = Error(None, ErrorInfo("shutting-down", "bye"))
                            await sock.send(
                                encode_frame(encode_message(Result(rid, {})))
                                + encode_frame(encode_message(last_words))
                            )
                        answered += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            for _ in range(rounds):  # trio's scheduler varies the order: try it often
                async with open_client(path) as client:
                    assert await client.quit() == {}
        listener.close()


def refusal_frame(code: str) -> bytes:
    return encode_frame(encode_message(Error(None, ErrorInfo(code, f"{code} (fake server)"))))


def hold_sends_until(monkeypatch: pytest.MonkeyPatch, event: Callable[[], trio.Event]) -> None:
    """The client sends a frame the moment its socket takes it: to see what it does when
    the server went away first, its sends wait until ``event()`` is set."""
    send_frame = Client._send_frame

    async def held(self: Client, frame: bytes, fds: list[int]) -> None:
        await event().wait()
        await send_frame(self, frame, fds)

    monkeypatch.setattr(Client, "_send_frame", held)


async def test_a_refusal_that_makes_the_hello_fail_still_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server writes its connection-level error and closes before the client has sent
    ``hello``: that send fails (EPIPE) while the reason is already in the client's receive
    buffer, or already taken by its reader task and not yet looked at. Either way the
    ClosedByPeer carries the server's reason. Round after round, because which task gets
    to the bytes first is up to trio's scheduler."""
    rounds = 50
    hello_arrived = 0
    closed = trio.Event()
    hold_sends_until(monkeypatch, lambda: closed)
    with short_tmpdir() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = os.path.join(tmp, "fake.sock")
        listener.bind(path)
        listener.listen(rounds)
        listener.setblocking(False)

        async def fake_server() -> None:
            nonlocal hello_arrived, closed
            for _ in range(rounds):
                await trio.lowlevel.wait_readable(listener)
                # no checkpoint from here on: accept, refuse, note whether hello came, close
                sock, _ = listener.accept()
                with sock:
                    sock.send(refusal_frame("too-many-connections"))
                    with contextlib.suppress(BlockingIOError):
                        hello_arrived += bool(sock.recv(1, socket.MSG_DONTWAIT))
                closed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            await trio.testing.wait_all_tasks_blocked()  # the server waits before we connect
            for _ in range(rounds):
                closed = trio.Event()
                with trio.fail_after(2), pytest.raises(ClosedByPeer) as info:
                    async with open_client(path):
                        pass
                assert info.value.error is not None, info.value
                assert info.value.error.code == "too-many-connections"
    # the case under test: the server was gone before the client's hello went out
    assert hello_arrived == 0


async def test_last_words_that_come_after_the_failed_send_are_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server stops reading (shutdown SHUT_RD) before the client's hello, so that send
    fails at once (EPIPE), and says why a moment later, then closes: the client waits a
    little for them instead of reporting a connection closed without a reason."""
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "fake.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)
        hello: list[bytes] = []
        shut = trio.Event()
        hold_sends_until(monkeypatch, lambda: shut)

        async def fake_server() -> None:
            sock, _ = await listener.accept()
            with sock:
                sock.shutdown(trio.socket.SHUT_RD)
                shut.set()
                await trio.sleep(0.05)
                await sock.send(refusal_frame("access-denied"))
                with contextlib.suppress(BlockingIOError):
                    hello.append(os.read(sock.fileno(), 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            with trio.fail_after(2), pytest.raises(ClosedByPeer) as info:
                async with open_client(path):
                    pass
            assert info.value.error is not None, info.value
            assert info.value.error.code == "access-denied"
            assert trio.current_time() - start < 1
        listener.close()
    assert hello in ([], [b""])  # the hello never reached the server: its send failed


async def test_refused_by_the_real_server_says_why_every_time() -> None:
    with short_tmpdir() as tmp:
        server = make_server(RecordingMachine(), ServerConfig(max_connections=1))
        async with trio.open_nursery() as nursery:
            path = await nursery.start(server.serve, os.path.join(tmp, "vm.sock"))
            async with open_client(path) as first:
                for _ in range(50):
                    with trio.fail_after(2), pytest.raises(ClosedByPeer) as info:
                        async with open_client(path, client_name="one too many"):
                            pass
                    assert info.value.error is not None, info.value
                    assert info.value.error.code == "too-many-connections"
                assert (await first.query_status())["state"] == "running"
            nursery.cancel_scope.cancel()


async def test_arguments_left_at_their_defaults_are_not_sent() -> None:
    """So that a newer client can speak to an older server of the same major version,
    which refuses arguments it does not know (the server fills defaults in)."""
    sent: list[tuple[str, dict[str, Any]]] = []

    class Recording(Client):
        def __init__(self) -> None:  # no connection: only what the methods send
            pass

        async def call(
            self, command: str, /, *, fds: Any = None, on_progress: Any = None, **args: Any
        ) -> Any:
            sent.append((command, args))
            return {}

    client = Recording()
    await client.pause()
    await client.pause(lease=5.0)
    await client.dump_dirty(out=3)
    await client.dump_dirty(out=3, format="snapshot", section=8192, epoch="e")
    await client.hello(versions=[1])
    assert sent == [
        ("pause", {}),
        ("pause", {"lease": 5.0}),
        ("dump-dirty", {}),
        ("dump-dirty", {"format": "snapshot", "section": 8192, "epoch": "e"}),
        ("hello", {"versions": [1]}),
    ]
