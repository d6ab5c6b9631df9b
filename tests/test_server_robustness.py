"""Slow, stuck, vanishing and numerous clients: the others, and the machine, carry on."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest
import trio

from tests.control_support import RecordingMachine, serving
from vmipc.protocol import Error, Event, Result, encode_frame, load_schema, pack
from vmipc.server import PROGRESS_INTERVAL, ServerConfig
from vmipc.vmm.runstate import RunState


def test_a_client_that_never_reads_does_not_block_the_others() -> None:
    config = ServerConfig(outbound_queue=8)
    with serving(config) as s, s.connect() as stuck, s.connect() as busy:
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.result(stuck.request("subscribe", args={"events": ["state-change"]}))
        worst = 0.0
        for _ in range(300):  # 600 events for a client that never reads them
            start = time.monotonic()
            busy.result(busy.request("pause"))
            busy.result(busy.request("resume"))
            worst = max(worst, time.monotonic() - start)
        assert worst < 0.5, f"a round trip took {worst:.3f}s while a client was stuck"
        # the stuck client overflowed its queue and was closed; what it got is intact
        got = stuck.wait_closed()
        assert got and all(isinstance(m, Event) for m in got)
        assert s.machine.state is RunState.RUNNING


def test_a_slow_pause_does_not_delay_other_connections() -> None:
    machine = RecordingMachine(pause_delay=0.5)
    with serving(machine=machine) as s, s.connect() as pauser, s.connect() as other:
        rid = pauser.request("pause")
        time.sleep(0.05)
        start = time.monotonic()
        other.result(other.request("query-status"))
        assert time.monotonic() - start < 0.2
        pauser.result(rid)


def test_state_changes_are_serialised_across_connections() -> None:
    machine = RecordingMachine(pause_delay=0.2)
    with serving(machine=machine) as s, s.connect() as a, s.connect() as b:
        ra = a.request("pause")
        rb = b.request("pause")
        replies = [a.reply(ra), b.reply(rb)]
        codes = sorted("ok" if isinstance(r, Result) else r.error.code for r in replies)
        assert codes == ["invalid-state", "ok"]
        assert s.machine.state is RunState.PAUSED


def test_disconnecting_mid_frame_changes_nothing() -> None:
    with serving() as s:
        with s.connect() as c:
            c.send_raw(encode_frame(pack({"type": "request", "id": 1, "command": "pause"}))[:-3])
        s.wait_connections(0)
        assert s.machine.calls == []
        with s.connect() as other:
            assert other.result(other.request("query-status"))["state"] == "running"


def test_a_peer_gone_before_its_reply_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """The reply is sent straight from the request's task: a peer that closed (EPIPE,
    ECONNRESET) only ends its connection; nothing is logged as a failure."""
    with serving() as s, caplog.at_level(logging.WARNING, logger="vmipc"):
        for _ in range(20):
            with s.connect() as c:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.request("test-sleep", args={"seconds": 0.01})
            # closed with a reset while the request runs: its reply meets a dead socket
        s.wait_connections(0)
        with s.connect() as other:
            assert other.result(other.request("query-status"))["state"] == "running"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_disconnecting_cancels_cancellable_requests() -> None:
    with serving() as s:
        with s.connect() as c:
            c.request("test-sleep", args={"seconds": 30.0})
            time.sleep(0.05)
        start = time.monotonic()
        s.wait_connections(0, timeout=2)
        assert time.monotonic() - start < 1


def test_a_half_closed_client_still_gets_its_replies() -> None:
    with serving() as s, s.connect() as c:
        rid = c.request("test-sleep", args={"seconds": 0.1})
        c.sock.shutdown(socket.SHUT_WR)
        assert c.result(rid) == {"slept": 0.1}
        assert c.wait_closed() == []


def test_progress_events_are_throttled_and_end_with_the_total() -> None:
    with serving() as s, s.connect() as c:
        c.result(c.request("subscribe", args={"events": ["progress"]}))
        rid = c.request("test-sleep", args={"seconds": 0.5})
        c.result(rid)
        progress = []
        for msg in c._inbox:
            assert isinstance(msg, Event)
            progress.append(msg)
        c._inbox.clear()
        assert progress, "no progress events"
        assert all(e.event == "progress" and e.data["request"] == rid for e in progress)
        assert progress[0].data["done"] == 0
        assert progress[-1].data == {
            "request": rid,
            "command": "test-sleep",
            "phase": "sleeping",
            "done": 20,
            "total": 20,
        }
        # 21 reports in 0.5 s, at most one per PROGRESS_INTERVAL (+ first and last) sent
        assert len(progress) <= 0.5 / PROGRESS_INTERVAL + 3


def test_progress_is_not_sent_without_a_subscription() -> None:
    with serving() as s, s.connect() as c:
        rid = c.request("test-sleep", args={"seconds": 0.1})
        assert isinstance(c.next_message(), Result)
        assert rid


def test_many_clients_at_once() -> None:
    with serving() as s:
        errors: list[BaseException] = []

        def client() -> None:
            try:
                with s.connect() as c:
                    for _ in range(20):
                        assert c.result(c.request("query-status"))["vcpu_count"] == 2
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []


def test_spontaneous_state_changes_reach_subscribers() -> None:
    machine = RecordingMachine()
    with serving(machine=machine) as s, s.connect() as c:
        c.result(c.request("subscribe", args={"events": ["state-change"]}))
        machine.stop_reason = "guest powered off (code 0)"
        threading.Thread(target=machine._set, args=(RunState.SHUTDOWN,)).start()
        event = c.event()
        assert event.data == {
            "old": "running",
            "new": "shutdown",
            "reason": "guest powered off (code 0)",
        }
        err = c.error(c.request("pause"))
        assert err.error.details == {"state": "shutdown", "allowed": ["running"]}


def test_quit_returns_even_with_a_stuck_client() -> None:
    config = ServerConfig(shutdown_grace=0.3, outbound_queue=4)
    with serving(config) as s, s.connect() as stuck, s.connect() as c:
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.result(stuck.request("subscribe", args={"events": ["state-change"]}))
        for _ in range(50):
            c.result(c.request("pause"))
            c.result(c.request("resume"))
        start = time.monotonic()
        c.result(c.request("quit"))
        assert s.thread.join(3)
        assert time.monotonic() - start < 2
        assert isinstance(c.wait_closed()[-1], Error)


def test_progress_from_a_worker_thread_is_throttled_there() -> None:
    import trio

    from vmipc.commands import CommandContext, HandlerEntry
    from vmipc.server import Server

    calls = 0

    async def chatty(ctx: CommandContext) -> dict[str, object]:
        def work() -> None:
            nonlocal calls
            for i in range(200_000):  # e.g. once per page
                ctx.progress("copying", i, 200_000)
                calls += 1
            ctx.progress("copying", 200_000, 200_000)

        await trio.to_thread.run_sync(work)
        return {"slept": 0.0}

    with serving() as s, s.connect() as c:
        server: Server = s.thread.server
        server.handlers["test-sleep"] = HandlerEntry("test-sleep", chatty, exclusive=False)
        c.result(c.request("subscribe", args={"events": ["progress"]}))
        rid = c.request("test-sleep", args={"seconds": 0.0})
        c.result(rid)
        events = [m for m in c._inbox if isinstance(m, Event)]
        c._inbox.clear()
        assert calls == 200_000
        assert 1 <= len(events) <= 20
        assert events[-1].data["done"] == events[-1].data["total"] == 200_000


# --- nothing a connection does, or a bug in its handling, ends the server --------------


def request(rid: int, command: str) -> bytes:
    return encode_frame(pack({"type": "request", "id": rid, "command": command}))


def test_a_pipelining_client_that_reads_late_is_held_back_not_refused() -> None:
    """The outgoing queue is bounded in bytes: a client that sends many requests with
    large answers and does not read is no longer read from while its replies wait (the
    server's memory stays bounded); when it reads, every reply is there, in order."""
    config = ServerConfig(max_queued_bytes=100_000)
    with serving(config) as s, s.connect(timeout=20) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        size = len(encode_frame(pack(load_schema().document)))
        rids = list(range(1, 101))  # ~2.5 MB of answers
        c.send_raw(b"".join(request(rid, "query-commands") for rid in rids))
        peak = 0
        for _ in range(50):
            queued = s.thread.run_sync(
                lambda: max(conn._queued_bytes for conn in s.thread.server._connections)
            )
            peak = max(peak, queued)
            time.sleep(0.01)
        assert 0 < peak <= config.max_queued_bytes + size
        for rid in rids:  # all answered, none refused (limit-exceeded) or dropped
            assert c.result(rid)["version"] == load_schema().version


def test_a_bad_progress_report_from_a_worker_thread_is_dropped() -> None:
    from vmipc.commands import CommandContext, HandlerEntry

    async def bad_reporter(ctx: CommandContext) -> dict[str, object]:
        # a bug in a handler: a float where the event wants an int, reported from a worker
        # thread (through run_sync_soon, where an exception would end trio.run)
        await trio.to_thread.run_sync(ctx.progress, "copying", 0.5, None)
        await trio.sleep(0.05)
        return {"slept": 0.0}

    with serving() as s, s.connect() as c:
        s.thread.server.handlers["test-sleep"] = HandlerEntry("test-sleep", bad_reporter, False)
        c.result(c.request("subscribe", args={"events": ["progress"]}))
        assert c.result(c.request("test-sleep", args={"seconds": 0.0})) == {"slept": 0.0}
        assert s.thread.alive
        assert c.result(c.request("query-status"))["state"] == "running"


def test_a_state_change_that_cannot_be_sent_does_not_end_the_server() -> None:
    machine = RecordingMachine()
    with serving(machine=machine) as s, s.connect() as c:
        c.result(c.request("subscribe", args={"events": ["state-change"]}))
        machine.stop_reason = 42  # type: ignore[assignment]  # not a string: off-schema
        threading.Thread(target=machine._set, args=(RunState.PAUSED,)).start()
        time.sleep(0.2)
        assert s.thread.alive
        machine.stop_reason = None
        assert c.result(c.request("resume")) is not None
        assert c.event().data == {"old": "paused", "new": "running", "reason": None}


def test_a_failing_connection_closes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import vmipc.server._server as server_module

    def broken(fd: int) -> bool:
        raise RuntimeError("a bug in the connection's handling")

    with serving() as s, s.connect() as other:
        monkeypatch.setattr(server_module, "peer_hung_up", broken)
        with s.connect() as c:
            c.sock.shutdown(socket.SHUT_WR)  # the reader's end of input meets the bug
            assert c.wait_closed() == []
        s.wait_connections(1)
        assert s.thread.alive
        assert other.result(other.request("query-status"))["state"] == "running"
