"""Connection limits per socket, the monitors' idle timeout, and the refusal log.

Monitoring clients on the read-only socket must never keep control clients out: each
socket has its own connection limit, and a monitor that neither asks nor listens is
closed after a while. The first tests run a real ``vmipc vmm``; the others the server over
a stand-in machine."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator

import pytest

from tests.control_support import (
    RawConnection,
    RecordingMachine,
    ServerThread,
    serving,
    short_tmpdir,
)
from tests.seq_support import VmmProcess, wait_for
from vmipc.client import SyncClient
from vmipc.protocol import Error
from vmipc.server import ServerConfig, SocketConfig

#: the read-only socket's default limit (SocketConfig.max_connections)
READ_ONLY_LIMIT = 32


def attempt(path: str) -> RawConnection | str:
    """Connect and say hello: the open connection, or the code of the refusal."""
    conn = RawConnection(path, timeout=20)
    try:
        conn.hello()
        return conn
    except (AssertionError, EOFError, ConnectionResetError, BrokenPipeError):
        pass  # refused: the error frame was kept aside (or is still to come)
    try:
        got = conn.wait_closed()
    finally:
        conn.close()
    codes = [m.error.code for m in got if isinstance(m, Error) and m.id is None]
    return codes[0] if codes else "closed"


def admitted(path: str, refusals: list[str]) -> bool:
    got = attempt(path)
    if isinstance(got, str):
        refusals.append(got)
        return False
    got.close()
    return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def vmm_with_read_only_socket(tmp: str, *more: str) -> Iterator[tuple[VmmProcess, str]]:
    ro = os.path.join(tmp, "ro.sock")
    args = ["--guest", "builtin", "--memory", "64M", "--readonly-socket", ro, *more]
    vmm = VmmProcess(tmp, "vm", args, [])
    try:
        wait_for(lambda: os.path.exists(ro), 20, "the read-only socket")
        yield vmm, ro
    finally:
        vmm.stop()


@pytest.mark.kvm
def test_read_only_clients_cannot_lock_out_the_control_socket() -> None:
    with short_tmpdir() as tmp, vmm_with_read_only_socket(tmp) as (vmm, ro):
        with SyncClient(vmm.socket, timeout=20) as control:
            assert control.query_status()["state"] == "running"
        fds_before = fd_count(vmm.pid)
        monitors: list[RawConnection] = []
        refusals: list[str] = []
        try:
            for _ in range(160):  # more than the old shared limit of 128
                got = attempt(ro)
                if isinstance(got, str):
                    refusals.append(got)
                else:
                    monitors.append(got)
            # the control socket keeps its own room, whatever the monitors do
            with SyncClient(vmm.socket, timeout=20) as control:
                assert control.query_status()["state"] == "running"
            assert len(monitors) == READ_ONLY_LIMIT
            assert refusals == ["too-many-connections"] * (160 - READ_ONLY_LIMIT)
            grown = fd_count(vmm.pid) - fds_before
            assert grown <= READ_ONLY_LIMIT + 4, grown
        finally:
            for conn in monitors:
                conn.close()
        # the monitors' slots come back (a slot a moment after its socket: retry)
        wait_for(lambda: fd_count(vmm.pid) <= fds_before + 2, 20, "the monitors' fds closed")
        wait_for(lambda: admitted(ro, refusals), 20, "a read-only connection admitted again")
        with SyncClient(vmm.socket, timeout=20) as control:
            control.quit()
        assert vmm.wait_exit() == 0
        # 128 refusals: one line, then a summary, not 128 lines
        check_refusal_log(vmm.stderr.read_text().splitlines(), len(refusals))


@pytest.mark.kvm
def test_an_idle_monitor_is_closed_and_a_subscribed_one_is_not() -> None:
    with (
        short_tmpdir() as tmp,
        vmm_with_read_only_socket(tmp, "--readonly-idle-timeout", "1") as (vmm, ro),
        SyncClient(ro, timeout=20, events=["state-change"]) as listening,
        SyncClient(vmm.socket, timeout=20) as control,
        RawConnection(ro, timeout=30) as idle,
    ):
        idle.hello()
        # opened after the listener, so it is closed first if the listener counted as idle
        got = idle.wait_closed()
        assert [(m.id, m.error.code) for m in got if isinstance(m, Error)] == [
            (None, "idle-timeout")
        ]
        assert listening.query_status()["state"] == "running"
        control.pause()
        assert listening.next_event().data["new"] == "paused"
        assert control.query_status()["state"] == "paused"  # the control socket: no timeout


# --- the server over a stand-in machine -----------------------------------------------


@contextlib.contextmanager
def two_sockets(
    config: ServerConfig | None = None, **read_only: object
) -> Iterator[tuple[ServerThread, str, str]]:
    with short_tmpdir() as tmp:
        ro = os.path.join(tmp, "ro.sock")
        extra = SocketConfig(ro, name="read-only", **read_only)  # type: ignore[arg-type]
        config = config or ServerConfig()
        config = ServerConfig(
            max_connections=config.max_connections,
            handshake_timeout=config.handshake_timeout,
            extra_sockets=(extra,),
        )
        thread = ServerThread(RecordingMachine(), os.path.join(tmp, "vm.sock"), config).start()
        try:
            yield thread, thread.path, ro
        finally:
            thread.stop()


def test_each_socket_has_its_own_connection_limit() -> None:
    with two_sockets(ServerConfig(max_connections=2), max_connections=3) as (_, main, ro):
        held = [attempt(ro) for _ in range(3)] + [attempt(main) for _ in range(2)]
        try:
            assert all(isinstance(c, RawConnection) for c in held)
            assert attempt(ro) == "too-many-connections"
            assert attempt(main) == "too-many-connections"
        finally:
            for c in held:
                if isinstance(c, RawConnection):
                    c.close()


def test_the_read_only_socket_defaults_to_its_own_limit() -> None:
    assert SocketConfig("x").max_connections == READ_ONLY_LIMIT
    assert ServerConfig().max_connections == 128


def test_idle_means_no_request_in_flight_and_no_subscription() -> None:
    with (
        two_sockets(idle_timeout=0.5) as (_, main, ro),
        RawConnection(main, timeout=30) as control,
        RawConnection(ro, timeout=30) as listening,
        RawConnection(ro, timeout=30) as silent,
        RawConnection(ro, timeout=30) as idle,
    ):
        control.hello()
        listening.hello()
        assert listening.result(listening.request("subscribe", args={"events": ["progress"]}))
        # a subscription to no event is no subscription
        silent.hello()
        silent.result(silent.request("subscribe", args={"events": []}))
        idle.hello()
        for conn in (silent, idle):
            got = conn.wait_closed()
            errors = [m for m in got if isinstance(m, Error)]
            assert [(m.id, m.error.code) for m in errors] == [(None, "idle-timeout")]
            assert errors[0].error.details == {"timeout": 0.5}
        # opened before ``idle``: they would have been closed first
        assert listening.result(listening.request("query-status"))["state"] == "running"
        assert control.result(control.request("query-status"))["state"] == "running"


def test_a_request_in_flight_keeps_a_monitor_open() -> None:
    # test-block runs for longer than the idle timeout; the allow-list admits it
    allowed = frozenset({"query-status", "test-block"})
    with (
        two_sockets(idle_timeout=1.0, allowed_commands=allowed) as (_, _main, ro),
        RawConnection(ro, timeout=30) as busy,
        RawConnection(ro, timeout=30) as idle,
    ):
        busy.hello()
        rid = busy.request("test-block", args={"seconds": 3.0})
        idle.hello()
        got = idle.wait_closed()
        assert [m.error.code for m in got if isinstance(m, Error)] == ["idle-timeout"]
        # ``busy`` was looked at before ``idle`` and found busy; had it been taken for
        # idle, it would be closed by now and the request after this one would fail
        assert busy.result(rid) == {}
        # its countdown starts afresh when its request is answered: still open now
        assert busy.result(busy.request("query-status"))["state"] == "running"


def test_the_control_socket_may_have_an_idle_timeout_too() -> None:
    config = ServerConfig(idle_timeout=0.5)
    with serving(config) as s, s.connect() as idle:
        got = idle.wait_closed()
        assert [m.error.code for m in got if isinstance(m, Error)] == ["idle-timeout"]


def test_refusals_are_logged_once_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmipc.server")
    with two_sockets(max_connections=0) as (_, _main, ro):
        for _ in range(20):
            assert attempt(ro) == "too-many-connections"
    # the summary comes when its interval is over, or (here) when the server stops
    check_refusal_log([r.getMessage() for r in caplog.records], 20)


def check_refusal_log(messages: list[str], refusals: int) -> None:
    """One line for the first refusal, then summaries (at most one per interval) that
    count every other one."""
    lines = [m for m in messages if "refused" in m]
    assert "too many connections" in lines[0] and "read-only" in lines[0], lines
    counts = [re.search(r"(\d+) more connections refused in the last", m) for m in lines[1:]]
    assert all(counts), lines
    assert sum(int(m.group(1)) for m in counts if m) == refusals - 1
    assert len(lines) <= 4, lines
