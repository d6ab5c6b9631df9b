"""One conversation per command and per documented error, in raw frames over a real socket.

Every test runs inside ``serving()``, which fails if the server leaks an fd.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import termios
import time
from collections.abc import Callable

import pytest

import vmipc
from tests.control_support import (
    RawConnection,
    RecordingMachine,
    schema_with_test_commands,
    serving,
)
from vmipc.protocol import Error, ErrorInfo, Event, Result, Schema, encode_frame, pack
from vmipc.server import ServerConfig
from vmipc.vmm.machine_api import InvalidStateError
from vmipc.vmm.runstate import RunState

# --- commands -------------------------------------------------------------------------


def test_hello_negotiates_and_describes_the_server() -> None:
    with serving() as s, s.connect(hello=False) as c:
        rid = c.request("hello", args={"versions": [3, 1, 2], "client": "test/1"})
        result = c.result(rid)
        schema = schema_with_test_commands()
        assert result["protocol"] == schema.version
        assert result["server"] == {
            "name": "vmipc",
            "version": vmipc.__version__,
            "pid": os.getpid(),
        }
        assert result["commands"] == sorted(schema.commands)
        assert result["events"] == sorted(schema.events)
        assert set(result["capabilities"]) == {"fd-passing", "events", "progress", "cancel"}
        assert result["limits"] == {
            "max_frame_size": 1 << 20,
            "max_fds_per_request": 8,
            "max_in_flight": 32,
            "max_request_size": 4 << 10,
        }
        assert isinstance(result["connection"], int) and result["connection"] > 0


def test_hello_with_no_common_version_is_unsupported_version_and_may_retry() -> None:
    with serving() as s, s.connect(hello=False) as c:
        err = c.error(c.request("hello", args={"versions": [2, 7]}))
        assert err.error.code == "unsupported-version"
        assert err.error.details == {"supported": [1], "offered": [2, 7]}
        # still in the handshake: other requests are refused, a new hello works
        assert c.error(c.request("query-status")).error.code == "handshake-required"
        assert c.result(c.request("hello", args={"versions": [1]}))["protocol"].startswith("1.")


def test_query_commands_returns_the_schema_the_server_implements() -> None:
    with serving() as s, s.connect() as c:
        document = c.result(c.request("query-commands"))
        assert document == dict(schema_with_test_commands().document)
        assert Schema.from_document(document).commands == schema_with_test_commands().commands


def test_query_status() -> None:
    with serving() as s, s.connect() as c:
        assert c.result(c.request("query-status")) == {
            "state": "running",
            "vcpu_count": 2,
            "memory_size": 64 << 20,
            "stop_reason": None,
            "lease": None,
            "first": [],
        }


def test_pause_and_resume_change_the_machine_state() -> None:
    with serving() as s, s.connect() as c:
        assert c.result(c.request("pause")) == {}
        assert s.machine.state is RunState.PAUSED
        assert c.result(c.request("query-status"))["state"] == "paused"
        assert c.result(c.request("resume")) == {}
        assert s.machine.state is RunState.RUNNING
        assert s.machine.calls == ["pause", "resume"]


def test_resume_answers_before_the_vcpus_are_let_go() -> None:
    """The reply to resume is in the client's socket when the vCPU threads are woken, so
    that a vCPU busy in the guest cannot hold up the reply a migration's downtime waits
    for; and they are woken, once."""
    with serving() as s, s.connect() as c:
        assert c.result(c.request("pause")) is not None
        waiting: list[int] = []

        def look() -> None:
            waiting.append(
                int.from_bytes(
                    fcntl.ioctl(c.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little"
                )
            )

        s.machine.on_wake = look
        rid = c.request("resume")
        _wait_for(lambda: s.machine.wakes == 1, "the vCPUs to be let go")
        assert waiting and waiting[0] > 0  # the reply was there already
        assert c.result(rid) == {}
        assert s.machine.state is RunState.RUNNING and s.machine.wakes == 1


def test_pause_belongs_to_the_machine_not_the_connection() -> None:
    with serving() as s:
        with s.connect() as a:
            a.result(a.request("pause"))
        s.wait_connections(0)
        assert s.machine.state is RunState.PAUSED  # closing the pauser resumes nothing
        with s.connect() as b:
            b.result(b.request("resume"))
        assert s.machine.state is RunState.RUNNING


def test_subscribe_delivers_state_changes_from_other_connections() -> None:
    with serving() as s, s.connect() as watcher, s.connect() as actor:
        assert watcher.result(watcher.request("subscribe", args={"events": ["state-change"]})) == {
            "events": ["state-change"]
        }
        actor.result(actor.request("pause"))
        event = watcher.event()
        assert (event.event, event.data) == (
            "state-change",
            {"old": "running", "new": "paused", "reason": None},
        )
        assert abs(event.time - time.time()) < 60
        watcher.result(watcher.request("subscribe", args={"events": []}))
        actor.result(actor.request("resume"))
        # unsubscribed: the next thing the watcher sees is the reply to its own request
        rid = watcher.request("query-status")
        assert isinstance(watcher.next_message(), Result)
        assert rid


def test_subscribe_to_an_unknown_event_is_invalid_arguments() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("subscribe", args={"events": ["state-change", "weather"]}))
        assert err.error.code == "invalid-arguments"
        assert err.error.details == {"argument": "events[1]", "problem": "unknown event"}


def test_cancel_a_cancellable_request() -> None:
    with serving() as s, s.connect() as c:
        slow = c.request("test-sleep", args={"seconds": 30.0})
        time.sleep(0.05)
        assert c.result(c.request("cancel", args={"request": slow})) == {"cancelled": True}
        err = c.error(slow)
        assert err.error.code == "cancelled"
        assert err.error.message == f"request {slow} was cancelled"


def test_cancel_of_an_unknown_or_finished_request_says_false() -> None:
    with serving() as s, s.connect() as c:
        done = c.request("query-status")
        c.result(done)
        assert c.result(c.request("cancel", args={"request": done})) == {"cancelled": False}
        assert c.result(c.request("cancel", args={"request": 424242})) == {"cancelled": False}


def test_cancel_cannot_stop_a_started_non_cancellable_request() -> None:
    with serving() as s, s.connect() as c:
        blocked = c.request("test-block", args={"seconds": 0.3})
        time.sleep(0.1)
        assert c.result(c.request("cancel", args={"request": blocked})) == {"cancelled": False}
        assert c.result(blocked) == {}


def test_quit_answers_then_tells_everyone_and_closes_the_machine() -> None:
    with serving() as s, s.connect() as other, s.connect() as c:
        assert c.result(c.request("quit")) == {}
        assert c.wait_closed() == [Error(None, _shutting_down())]
        assert other.wait_closed() == [Error(None, _shutting_down())]
        assert s.thread.join(5), "serve() did not return after quit"
        assert s.machine.calls[-1] == "close"
        assert s.machine.state is RunState.DESTROYED
        assert not os.path.exists(s.path), "the socket file was left behind"


@pytest.mark.parametrize("trial", range(5))
def test_quit_tells_everyone_even_after_earlier_connections_came_and_went(trial: int) -> None:
    """The spec: on quit, every connection gets ``shutting-down``. Once one connection had
    closed, the server stopped waiting for the others to drain, and the quitting connection
    and idle ones often got no notice (2-5 times in 8)."""
    with serving() as s:
        with s.connect() as gone:
            gone.result(gone.request("query-status"))
        _wait_for(lambda: s.thread.server.connection_count == 0, "the first connection to end")
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(s.connect()) for _ in range(16)]
            c = stack.enter_context(s.connect())
            assert c.result(c.request("quit")) == {}
            assert c.wait_closed() == [Error(None, _shutting_down())]
            for other in idle:
                assert other.wait_closed() == [Error(None, _shutting_down())]
        assert s.thread.join(5), "serve() did not return after quit"


def test_quit_drains_replies_a_slow_reader_has_not_read_then_tells_it() -> None:
    """The deterministic form of the test above: a connection came and went, then another
    has replies queued that the kernel cannot take until it reads. The shutdown must wait
    for them (up to its grace); the notice comes after them. Before the fix the wait ended
    at once and the writer was cancelled with replies and notice unsent."""
    with serving() as s:
        with s.connect() as gone:
            gone.result(gone.request("query-status"))
        _wait_for(lambda: s.thread.server.connection_count == 0, "the first connection to end")
        with s.connect() as slow, s.connect() as c:
            # as many large replies as the connection's queue holds (2 MiB), far more than
            # the kernel's socket buffer: more would stop the server reading requests
            # (backpressure), and those unread at quit are refused, not answered
            size = len(pack(slow.result(slow.request("query-commands")))) + 64
            count = min(64, ServerConfig().max_queued_bytes // size - 1)
            assert count * size > 1 << 20
            ids = [slow.request("query-commands") for _ in range(count)]
            _wait_until_the_kernel_holds_no_more(slow)
            assert c.result(c.request("quit")) == {}
            got = slow.wait_closed()
            assert [m.id for m in got if isinstance(m, Result)] == ids
            assert got[-1] == Error(None, _shutting_down())
        assert s.thread.join(5), "serve() did not return after quit"


def test_replies_sent_straight_and_queued_arrive_whole_and_in_order() -> None:
    """A reply goes straight into the socket when nothing is queued before it, else to
    the writer's queue: a reader that falls behind (the kernel's buffer full, a reply half
    sent, more queued behind it) and then catches up gets every frame whole, in order,
    and the replies after that are sent straight again."""
    with serving() as s, s.connect() as c:
        size = len(pack(c.result(c.request("query-commands")))) + 64
        count = min(48, ServerConfig().max_queued_bytes // size - 1)
        assert count * size > 1 << 20  # far more than the kernel's socket buffer
        for _round in range(2):
            ids = [c.request("query-commands") for _ in range(count)]
            _wait_until_the_kernel_holds_no_more(c)
            got = []
            for _ in range(count):
                # a small reply asked for while the big ones drain: it goes behind them
                ids.append(c.request("query-status"))
                got.append(c.next_message())
            got += [c.next_message() for _ in range(count)]
            assert [m.id for m in got] == ids
            assert all(isinstance(m, Result) and m.result for m in got)
            assert c.result(c.request("query-status"))["state"] == "running"


def test_a_request_running_at_quit_answers_before_the_notice() -> None:
    """``shutting-down`` is a connection's last frame: a request that cannot be cancelled
    and was running when quit came answers first. Before, the notice went out at once and
    the reply after it, to a client that had been told the connection was over."""
    with serving() as s, s.connect() as busy, s.connect() as c:
        rid = busy.request("test-block", args={"seconds": 0.5})
        time.sleep(0.1)
        assert c.result(c.request("quit")) == {}
        got = busy.wait_closed()
        assert [type(m) for m in got] == [Result, Error], got
        assert got[0].id == rid and got[1] == Error(None, _shutting_down())
        assert s.thread.join(5), "serve() did not return after quit"


def _wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"waited 10 s for {what}"
        time.sleep(0.01)


def _wait_until_the_kernel_holds_no_more(conn: RawConnection) -> None:
    """Wait until the bytes waiting in ``conn``'s socket stop growing: the server's writer
    is then blocked, with more replies queued behind."""
    last, stable = -1, 0
    deadline = time.monotonic() + 10
    while stable < 5:
        assert time.monotonic() < deadline, "the server's replies never filled the socket"
        time.sleep(0.05)
        waiting = int.from_bytes(
            fcntl.ioctl(conn.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little"
        )
        stable = stable + 1 if waiting == last and waiting > 0 else 0
        last = waiting


def _shutting_down() -> ErrorInfo:
    return ErrorInfo("shutting-down", "the server is shutting down", {})


# --- request errors -------------------------------------------------------------------


def test_handshake_required_before_hello_and_after_it() -> None:
    with serving() as s, s.connect(hello=False) as c:
        err = c.error(c.request("pause"))
        assert err.error.code == "handshake-required"
        assert s.machine.calls == []
        c.hello()
        assert c.error(c.request("hello", args={"versions": [1]})).error.code == (
            "handshake-required"
        )


def test_invalid_message_without_an_id_echoes_null() -> None:
    with serving() as s, s.connect() as c:
        c.send_raw(encode_frame(b"\xc1 not msgpack"))
        err = c.error(None)
        assert err.error.code == "invalid-message"
        assert "msgpack" in err.error.message


def test_invalid_message_with_an_id_echoes_it() -> None:
    with serving() as s, s.connect() as c:
        c.send({"type": "request", "id": 77, "command": "pause", "colour": "red"})
        err = c.error(77)
        assert err.error.code == "invalid-message"
        assert "unknown keys colour" in err.error.message
        assert s.machine.calls == []


def test_a_duplicate_in_flight_id_is_invalid_message_with_null_id() -> None:
    with serving() as s, s.connect() as c:
        c.send({"type": "request", "id": 5, "command": "test-sleep", "args": {"seconds": 0.3}})
        c.send({"type": "request", "id": 5, "command": "query-status"})
        err = c.error(None)
        assert err.error.code == "invalid-message"
        assert err.error.details == {"id": 5, "problem": "duplicate id"}
        assert c.result(5) == {"slept": 0.3}


def test_unknown_command() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("self-destruct"))
        assert err.error.code == "unknown-command"
        assert err.error.details == {"command": "self-destruct"}


@pytest.mark.parametrize(
    ("args", "argument", "problem"),
    [
        ({}, "seconds", "missing required argument"),
        ({"seconds": 1.0, "extra": 1}, "extra", "unknown argument"),
        ({"seconds": "1"}, "seconds", "expected float, got string"),
    ],
)
def test_invalid_arguments(args: dict[str, object], argument: str, problem: str) -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("test-sleep", args=args))
        assert err.error.code == "invalid-arguments"
        assert err.error.details == {"argument": argument, "problem": problem}


def test_invalid_state_leaves_the_machine_alone() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("resume"))
        assert err.error.code == "invalid-state"
        assert err.error.message == "cannot resume while running"
        assert err.error.details == {"state": "running", "allowed": ["paused"]}
        assert s.machine.calls == []  # refused before the machine was asked
        assert s.machine.state is RunState.RUNNING


def test_invalid_state_raised_by_the_machine_itself() -> None:
    # the state check passed, but the machine changed its mind (e.g. the guest stopped)
    machine = RecordingMachine()

    def begin_pause(wake: Callable[[], None], *, within: float = 0.0) -> bool:
        raise InvalidStateError("pause", RunState.SHUTDOWN)

    machine.begin_pause = begin_pause  # type: ignore[method-assign]
    with serving(machine=machine) as s, s.connect() as c:
        err = c.error(c.request("pause"))
        assert err.error.code == "invalid-state"
        assert err.error.details == {"state": "shutdown", "allowed": ["running"]}


def test_limit_exceeded_when_too_many_requests_are_in_flight() -> None:
    with serving(ServerConfig(max_in_flight=2)) as s, s.connect() as c:
        first = c.request("test-sleep", args={"seconds": 0.2})
        second = c.request("test-sleep", args={"seconds": 0.2})
        err = c.error(c.request("query-status"))
        assert err.error.code == "limit-exceeded"
        assert err.error.details == {"limit": "max_in_flight", "value": 2}
        c.result(first)
        c.result(second)
        c.result(c.request("query-status"))


def test_internal_error_when_a_handler_fails() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("test-fail"))
        assert err.error.code == "internal-error"
        assert err.error.message == "test-fail failed: RuntimeError: boom"
        c.result(c.request("query-status"))  # and the server carries on


def test_internal_error_when_a_result_is_off_schema() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("test-bad-result"))
        assert err.error.code == "internal-error"
        assert "does not match its schema" in err.error.message


def test_shutting_down_refuses_requests_that_race_with_quit() -> None:
    with serving() as s, s.connect() as c:
        quit_id = c.request("quit")
        try:
            late: int | None = c.request("query-status")
        except (BrokenPipeError, ConnectionResetError):
            late = None  # the server had already answered quit and closed: also fine
        got = c.wait_closed()
        replies = {m.id: m for m in got if isinstance(m, Result | Error)}
        assert isinstance(replies[quit_id], Result)
        late_reply = replies.get(late) if late is not None else None
        # either it was answered before quit took effect, or it was refused
        assert (
            late_reply is None
            or isinstance(late_reply, Result)
            or (late_reply.error.code == "shutting-down")
        )
        assert s.thread.join(5)


# --- connection errors ----------------------------------------------------------------


def test_frame_too_large_is_refused_from_its_header_and_the_connection_closed() -> None:
    with serving(ServerConfig(max_frame_size=1000)) as s:
        with s.connect() as c:
            c.send_raw((1001).to_bytes(4, "big"))  # nothing more: refused on the header
            got = c.wait_closed()
            assert len(got) == 1 and isinstance(got[0], Error) and got[0].id is None
            assert got[0].error.code == "frame-too-large"
            assert got[0].error.details == {"size": 1001, "limit": 1000}
        with s.connect() as other:  # the server carries on
            other.result(other.request("query-status"))


def test_handshake_timeout_closes_a_client_that_never_speaks() -> None:
    config = ServerConfig(handshake_timeout=0.2)
    with serving(config) as s, s.connect(hello=False) as silent, s.connect() as talker:
        time.sleep(0.3)
        talker.result(talker.request("query-status"))  # unaffected, already handshaken
        got = silent.wait_closed()
        assert [m.error.code for m in got if isinstance(m, Error)] == ["handshake-timeout"]


def test_too_many_connections() -> None:
    with serving(ServerConfig(max_connections=2)) as s:
        with s.connect() as a, s.connect() as b, s.connect(hello=False) as c:
            got = c.wait_closed()
            assert [m.error.code for m in got if isinstance(m, Error)] == ["too-many-connections"]
            assert got[0].id is None  # type: ignore[union-attr]
            a.result(a.request("query-status"))
            b.result(b.request("query-status"))
        s.wait_connections(0)
        with s.connect() as d:
            d.result(d.request("query-status"))


def test_events_are_not_sent_to_connections_that_did_not_ask() -> None:
    with serving() as s, s.connect() as c:
        c.result(c.request("pause"))
        c.result(c.request("resume"))
        rid = c.request("query-status")
        msg = c.next_message()
        assert not isinstance(msg, Event)
        assert isinstance(msg, Result) and msg.id == rid
