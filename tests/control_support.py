"""Shared helpers for the control-protocol tests (server, client, CLI).

``RecordingMachine`` is a stand-in for the machine: these tests exercise the protocol and
its plumbing, not the VMM (the end-to-end tests in test_server_e2e.py run the real one).
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from vmipc.commands import CommandContext, HandlerEntry, load_handlers
from vmipc.protocol import (
    Error,
    Event,
    FrameDecoder,
    Request,
    Result,
    Schema,
    decode_message,
    encode_frame,
    load_schema,
    pack,
)
from vmipc.server import Server, ServerConfig
from vmipc.vmm.machine_api import InvalidStateError, StateChange
from vmipc.vmm.runstate import RunState


class RecordingMachine:
    """A stand-in for vmipc.vmm.machine.Machine that records what it was asked to do."""

    def __init__(self, state: RunState = RunState.RUNNING, pause_delay: float = 0.0) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._listeners: list[Callable[[StateChange], None]] = []
        self.calls: list[str] = []
        #: wake_vcpus calls, and a hook called in each (what the test looks at then)
        self.wakes = 0
        self.on_wake: Callable[[], None] | None = None
        self.pause_delay = pause_delay
        #: the thread finishing a slow pause (begin_pause)
        self._pausing: threading.Thread | None = None
        self.vcpu_count = 2
        self.memory_size = 64 << 20
        self.stop_reason: str | None = None

    @property
    def state(self) -> RunState:
        return self._state

    def _set(self, new: RunState) -> None:
        old, self._state = self._state, new
        for callback in list(self._listeners):
            callback(StateChange(old, new, self.stop_reason))

    def start(self) -> None:
        self.calls.append("start")
        self._set(RunState.RUNNING)

    def pause(self) -> None:
        self.calls.append("pause")
        with self._lock:
            if self._state is not RunState.RUNNING:
                raise InvalidStateError("pause", self._state)
            time.sleep(self.pause_delay)
            self._set(RunState.PAUSED)

    def begin_pause(self, wake: Callable[[], None], *, within: float = 0.0) -> bool:
        """As Machine.begin_pause: a pause that takes ``pause_delay`` seconds finishes on
        a thread of its own and wakes the caller."""
        self.calls.append("pause")
        with self._lock:
            if self._state is not RunState.RUNNING or self._pausing is not None:
                raise InvalidStateError("pause", self._state)
            if not self.pause_delay:
                self._set(RunState.PAUSED)
                return True

            def park() -> None:
                time.sleep(self.pause_delay)
                with self._lock:
                    self._pausing = None
                    self._set(RunState.PAUSED)
                wake()

            self._pausing = threading.Thread(target=park)
            self._pausing.start()
            return False

    def finish_pause(self, wake: Callable[[], None]) -> bool:
        with self._lock:
            if self._pausing is not None:
                return False
            if self._state is not RunState.PAUSED:
                raise InvalidStateError("pause", self._state)
            return True

    def resume(self, *, wake: bool = True) -> None:
        self.calls.append("resume")
        with self._lock:
            if self._state is not RunState.PAUSED:
                raise InvalidStateError("resume", self._state)
            self._set(RunState.RUNNING)
        if wake:
            self.wake_vcpus()

    def rehearse_load_state(self) -> None:
        self.calls.append("rehearse")

    def wake_vcpus(self) -> None:
        self.wakes += 1
        if self.on_wake is not None:
            self.on_wake()

    def close(self) -> None:
        self.calls.append("close")
        if self._state is not RunState.DESTROYED:
            self._set(RunState.DESTROYED)

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)


# --- test-only commands, to exercise fds, progress, cancellation and failures ----------

TEST_SCHEMA_EXTRA: dict[str, Any] = {
    "commands": [
        {
            "name": "test-write",
            "since": "1.0",
            "doc": "Write data to the out fd.",
            "args": [{"name": "data", "type": "bytes", "doc": "What to write."}],
            "fds": [{"name": "out", "direction": "out", "doc": "Where."}],
            "result": {
                "type": "map",
                "fields": [{"name": "written", "type": "int", "doc": "Bytes written."}],
            },
            "states": "any",
            "errors": [],
            "cancellable": False,
            "progress": False,
        },
        {
            "name": "test-read",
            "since": "1.0",
            "doc": "Read from the in fd.",
            "args": [
                {
                    "name": "size",
                    "type": "int",
                    "min": 1,
                    "default": 4096,
                    "doc": "At most this many bytes.",
                }
            ],
            "fds": [{"name": "in", "direction": "in", "doc": "From where."}],
            "result": {
                "type": "map",
                "fields": [{"name": "data", "type": "bytes", "doc": "What was read."}],
            },
            "states": "any",
            "errors": [],
            "cancellable": False,
            "progress": False,
        },
        {
            "name": "test-sleep",
            "since": "1.0",
            "doc": "Sleep, reporting progress.",
            "args": [{"name": "seconds", "type": "float", "doc": "How long."}],
            "fds": [],
            "result": {
                "type": "map",
                "fields": [{"name": "slept", "type": "float", "doc": "How long it slept."}],
            },
            "states": "any",
            "errors": [],
            "cancellable": True,
            "progress": True,
        },
        {
            "name": "test-block",
            "since": "1.0",
            "doc": "Block a worker thread; cannot be cancelled once started.",
            "args": [{"name": "seconds", "type": "float", "doc": "How long."}],
            "fds": [],
            "result": {"type": "map", "fields": []},
            "states": "any",
            "errors": [],
            "cancellable": False,
            "progress": False,
        },
        {
            "name": "test-fail",
            "since": "1.0",
            "doc": "Fail with an unforeseen exception.",
            "args": [],
            "fds": [],
            "result": {"type": "map", "fields": []},
            "states": "any",
            "errors": [],
            "cancellable": False,
            "progress": False,
        },
        {
            "name": "test-bad-result",
            "since": "1.0",
            "doc": "Return a result off-schema.",
            "args": [],
            "fds": [],
            "result": {"type": "map", "fields": []},
            "states": "any",
            "errors": [],
            "cancellable": False,
            "progress": False,
        },
    ]
}


async def _test_write(ctx: CommandContext) -> dict[str, Any]:
    fd = ctx.fds["out"]
    written = await trio.to_thread.run_sync(os.write, fd, ctx.args["data"])
    return {"written": written}


async def _test_read(ctx: CommandContext) -> dict[str, Any]:
    data = await trio.to_thread.run_sync(os.read, ctx.fds["in"], ctx.args["size"])
    return {"data": data}


async def _test_sleep(ctx: CommandContext) -> dict[str, Any]:
    total = ctx.args["seconds"]
    steps = 20
    for i in range(steps):
        ctx.progress("sleeping", i, steps)
        await trio.sleep(total / steps)
    ctx.progress("sleeping", steps, steps)
    return {"slept": float(total)}


async def _test_block(ctx: CommandContext) -> dict[str, Any]:
    await trio.to_thread.run_sync(time.sleep, ctx.args["seconds"])
    return {}


async def _test_fail(ctx: CommandContext) -> dict[str, Any]:
    raise RuntimeError("boom")


async def _test_bad_result(ctx: CommandContext) -> dict[str, Any]:
    return {"unexpected": 1}


def schema_with_test_commands() -> Schema:
    return load_schema().extended(TEST_SCHEMA_EXTRA)


def handlers_with_test_commands() -> dict[str, HandlerEntry]:
    handlers = dict(load_handlers())
    for name, func in [
        ("test-write", _test_write),
        ("test-read", _test_read),
        ("test-sleep", _test_sleep),
        ("test-block", _test_block),
        ("test-fail", _test_fail),
        ("test-bad-result", _test_bad_result),
    ]:
        handlers[name] = HandlerEntry(name, func, exclusive=False)
    return handlers


def make_server(machine: Any, config: ServerConfig | None = None) -> Server:
    return Server(
        machine, config, schema=schema_with_test_commands(), handlers=handlers_with_test_commands()
    )


@contextlib.contextmanager
def short_tmpdir() -> Iterator[str]:
    """A directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vmipc-t-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ServerThread:
    """A control server on its own trio loop in a thread, for blocking test clients."""

    def __init__(self, machine: Any, path: str, config: ServerConfig | None = None) -> None:
        self.machine = machine
        self.path = path
        self.server = make_server(machine, config)
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="control-server", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.serve, self.path)
                    self._started.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(10)
        if self.error is not None:
            raise self.error
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the server thread did not stop"

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's trio thread and return its result."""
        assert self._token is not None
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            box.append(fn())
            done.set()

        self._token.run_sync_soon(call)
        done.wait(5)
        return box[0]


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def wait_for_fds(baseline: set[int], timeout: float = 3.0) -> set[int]:
    """Wait until no fd beyond ``baseline`` is open; return those still open."""
    deadline = time.monotonic() + timeout
    while True:
        extra = open_fds() - baseline
        # fds the test itself may hold legitimately are listed by the caller in baseline
        if not extra or time.monotonic() > deadline:
            return {fd for fd in extra if _describe(fd) is not None}
        time.sleep(0.01)


def _describe(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def describe_fds(fds: set[int]) -> dict[int, str | None]:
    return {fd: _describe(fd) for fd in sorted(fds)}


class RawConnection:
    """A blocking socket speaking raw frames, for conversation and fuzz tests."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = FrameDecoder(max_frame_size=1 << 24)
        self._inbox: list[Result | Error | Event] = []
        self._next_id = 1000

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.sock.sendmsg([data], anc)
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.send_raw(encode_frame(pack(message)), fds)

    def request(self, command: str, attach: list[int] | None = None, **fields: Any) -> int:
        """Send a request (``attach``: fds to pass with it); return its id."""
        rid = self._next_id
        self._next_id += 1
        self.send({"type": "request", "id": rid, "command": command, **fields}, attach)
        return rid

    def hello(self) -> dict[str, Any]:
        rid = self.request("hello", args={"versions": [1]})
        reply = self.reply(rid)
        assert isinstance(reply, Result), reply
        return reply.result  # type: ignore[no-any-return]

    def next_message(self) -> Result | Error | Event:
        """The next message; raises EOFError when the server closed the connection."""
        while not self._inbox:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed by the server")
            self.decoder.feed(data)
            while (frame := self.decoder.next_frame()) is not None:
                msg = decode_message(frame.payload, allowed=frozenset({"result", "error", "event"}))
                assert not isinstance(msg, Request)
                self._inbox.append(msg)
        return self._inbox.pop(0)

    def reply(self, rid: int | None) -> Result | Error:
        """The reply to ``rid`` (events and other replies before it are kept aside)."""
        kept: list[Result | Error | Event] = []
        try:
            while True:
                msg = self.next_message()
                if isinstance(msg, Result | Error) and msg.id == rid:
                    return msg
                kept.append(msg)
        finally:
            self._inbox[:0] = kept

    def error(self, rid: int | None) -> Error:
        msg = self.reply(rid)
        assert isinstance(msg, Error), msg
        return msg

    def result(self, rid: int) -> Any:
        msg = self.reply(rid)
        assert isinstance(msg, Result), msg
        return msg.result

    def event(self) -> Event:
        for i, msg in enumerate(self._inbox):
            if isinstance(msg, Event):
                return self._inbox.pop(i)  # type: ignore[return-value]
        while True:
            msg = self.next_message()
            if isinstance(msg, Event):
                return msg
            self._inbox.append(msg)

    def wait_closed(self) -> list[Result | Error | Event]:
        """Read until the server closes; return what came before."""
        got = list(self._inbox)
        self._inbox.clear()
        while True:
            try:
                got.append(self.next_message())
            except EOFError:
                return got
            except ConnectionResetError:
                return got


class Served:
    """A running ServerThread with its machine, socket path and fd baseline."""

    def __init__(self, machine: RecordingMachine, thread: ServerThread, path: str) -> None:
        self.machine = machine
        self.thread = thread
        self.path = path
        self.baseline = open_fds()

    def connect(self, *, hello: bool = True, timeout: float = 5.0) -> RawConnection:
        conn = RawConnection(self.path, timeout)
        if hello:
            conn.hello()
        return conn

    def wait_connections(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while self.thread.run_sync(lambda: self.thread.server.connection_count) != count:
            assert time.monotonic() < deadline, "connections did not close"
            time.sleep(0.01)

    def assert_no_leaks(self) -> None:
        """Every client is gone: the server holds exactly the fds it held when it started."""
        self.wait_connections(0)
        leaked = wait_for_fds(self.baseline)
        assert not leaked, f"fds leaked: {describe_fds(leaked)}"


@contextlib.contextmanager
def serving(
    config: ServerConfig | None = None, machine: RecordingMachine | None = None
) -> Iterator[Served]:
    machine = machine or RecordingMachine()
    with short_tmpdir() as tmp:
        before = open_fds()
        thread = ServerThread(machine, os.path.join(tmp, "vm.sock"), config).start()
        served = Served(machine, thread, thread.path)
        try:
            yield served
            if thread.alive:
                served.assert_no_leaks()
        finally:
            thread.stop()
        leaked = wait_for_fds(before)
        assert not leaked, f"fds leaked after the server stopped: {describe_fds(leaked)}"
