"""Connection classes: a second, read-only socket and per-socket command allow-lists.

The in-process tests run the server over a stand-in machine; the last one runs a real
``vmipc vmm --socket A --readonly-socket B`` (sandboxed, as by default)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.control_support import (
    RawConnection,
    RecordingMachine,
    Served,
    ServerThread,
    describe_fds,
    open_fds,
    short_tmpdir,
    wait_for_fds,
)
from tests.test_server_security import NOBODY, in_child_as, needs_root, talk
from vmipc.client import CommandError, SyncClient
from vmipc.protocol import Error, TypeSpec, load_schema
from vmipc.server import READ_ONLY_COMMANDS, Server, ServerConfig, SocketConfig, SocketPathError
from vmipc.vmm.runstate import RunState

VMIPC = [sys.executable, "-m", "vmipc"]

#: every command that changes the machine, reads guest data or stops the VMM
STATE_CHANGING = sorted(set(load_schema().commands) - READ_ONLY_COMMANDS)


@contextlib.contextmanager
def two_sockets(
    machine: RecordingMachine | None = None,
    main: dict[str, Any] | None = None,
    read_only: dict[str, Any] | None = None,
) -> Iterator[tuple[Served, str]]:
    """A server on ``vm.sock`` plus a read-only ``ro.sock``; yields (served, ro path).
    ``main`` and ``read_only``: more settings of the ServerConfig and the SocketConfig."""
    machine = machine or RecordingMachine()
    with short_tmpdir() as tmp:
        ro = os.path.join(tmp, "ro.sock")
        extra = SocketConfig(ro, name="read-only", **(read_only or {}))
        config = ServerConfig(extra_sockets=(extra,), **(main or {}))
        before = open_fds()
        thread = ServerThread(machine, os.path.join(tmp, "vm.sock"), config).start()
        served = Served(machine, thread, thread.path)
        try:
            yield served, ro
            served.assert_no_leaks()
        finally:
            thread.stop()
        leaked = wait_for_fds(before)
        assert not leaked, f"fds leaked after the server stopped: {describe_fds(leaked)}"
        assert sorted(os.listdir(tmp)) == [], "socket files were left behind"


def test_the_read_only_socket_allows_queries_and_refuses_everything_else() -> None:
    with two_sockets() as (s, ro):
        assert stat.S_IMODE(os.stat(ro).st_mode) == 0o600
        with RawConnection(ro) as c:
            assert c.hello()["commands"] == sorted(READ_ONLY_COMMANDS)
            assert c.result(c.request("query-status"))["state"] == "running"
            assert c.result(c.request("subscribe", args={"events": ["state-change"]}))
            assert c.result(c.request("query-commands"))["version"] == load_schema().version
            for command in STATE_CHANGING:
                spec = load_schema().commands[command]
                args = {a.name: _an_argument(a.type) for a in spec.args if a.required}
                # attach the fds the command wants: the server must close them unused
                pipes = [os.pipe() for _ in spec.fds]
                ends = list(zip(pipes, spec.fds, strict=True))
                ours = [w if f.direction == "in" else r for (r, w), f in ends]
                theirs = [r if f.direction == "in" else w for (r, w), f in ends]
                rid = c.request(command, attach=theirs, args=args, fds=[f.name for f in spec.fds])
                for fd in theirs:
                    os.close(fd)
                reply = c.reply(rid)
                assert isinstance(reply, Error), (command, reply)
                assert reply.error.code == "not-permitted", (command, reply.error)
                assert reply.error.details["command"] == command
                assert reply.error.details["allowed"] == sorted(READ_ONLY_COMMANDS)
                for fd in ours:  # the server's copies are closed: the pipe is broken
                    assert _other_end_closed(fd), command
                    os.close(fd)
            # the refusals did nothing, and the connection carries on
            assert c.result(c.request("query-status"))["state"] == "running"
        assert s.machine.calls == []
        with s.connect(hello=False) as main:  # the main socket has every command
            assert set(main.hello()["commands"]) >= set(load_schema().commands)
            main.result(main.request("pause"))
        assert s.machine.calls == ["pause"]


def _an_argument(spec: TypeSpec) -> object:
    """A value the schema accepts: the refusal must be the socket's, not the arguments'."""
    if spec.enum:
        return spec.enum[0]
    if spec.type == "int":
        return spec.minimum or 0
    return {"string": "x", "bool": False, "bytes": b"", "list": [], "map": {}}.get(spec.type, 0)


def _other_end_closed(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for _, events in poller.poll(100):
            if events & (select.POLLHUP | select.POLLERR):
                return True
    return False


def test_the_read_only_socket_still_gets_events() -> None:
    with two_sockets() as (s, ro), RawConnection(ro) as watcher:
        watcher.hello()
        watcher.result(watcher.request("subscribe", args={"events": ["state-change"]}))
        with s.connect() as main:
            main.result(main.request("pause"))
        event = watcher.event()
        assert event.event == "state-change"
        assert (event.data["old"], event.data["new"]) == ("running", "paused")


def test_an_allow_list_on_the_main_socket() -> None:
    machine = RecordingMachine(RunState.PAUSED)
    allowed = {"allowed_commands": frozenset({"query-status", "resume"})}
    with two_sockets(machine, allowed) as (s, _), SyncClient(s.path) as client:
        assert client.server_info["commands"] == ["hello", "query-status", "resume"]
        client.resume()
        with pytest.raises(CommandError) as refused:
            client.pause()
        assert refused.value.code == "not-permitted"
        assert "pause is not permitted on this socket" in str(refused.value)
        assert machine.calls == ["resume"]


def test_vmipc_call_reports_a_refusal_in_one_line() -> None:
    with two_sockets() as (s, ro):
        done = subprocess.run(
            [*VMIPC, "call", "--socket", ro, "quit"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [done.stderr.strip()]
        assert "not-permitted" in done.stderr
        assert s.machine.calls == []


def test_an_allow_list_naming_an_unknown_command_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no command named frobnicate"):
        Server(RecordingMachine(), ServerConfig(allowed_commands=frozenset({"frobnicate"})))
    with pytest.raises(ValueError, match="no command named frobnicate"):
        Server(
            RecordingMachine(),
            ServerConfig(extra_sockets=(SocketConfig("x", frozenset({"frobnicate"})),)),
        )


def test_bind_first_then_a_failed_bind_leaves_no_socket_behind() -> None:
    with short_tmpdir() as tmp:
        main, ro = os.path.join(tmp, "vm.sock"), os.path.join(tmp, "ro.sock")
        with open(ro, "w") as f:
            f.write("precious")
        server = Server(RecordingMachine(), ServerConfig(extra_sockets=(SocketConfig(ro),)))
        with pytest.raises(SocketPathError, match="exists and is not a socket"):
            server.bind(main)
        assert sorted(os.listdir(tmp)) == ["ro.sock"]
        os.unlink(ro)
        assert server.bind(main) == (main, ro)
        assert stat.S_ISSOCK(os.stat(main).st_mode) and stat.S_ISSOCK(os.stat(ro).st_mode)
        server.close_sockets()
        assert os.listdir(tmp) == []


@needs_root
def test_each_socket_checks_its_own_peer_credentials() -> None:
    # both files are open to everybody: the peer checks must tell them apart
    monitor = {"socket_mode": 0o666, "allowed_uids": frozenset({NOBODY})}
    with two_sockets(None, {"socket_mode": 0o666}, monitor) as (s, ro):
        os.chmod(os.path.dirname(s.path), 0o755)
        assert in_child_as(NOBODY, NOBODY, talk(ro)) == {"hello": load_schema().version}
        assert in_child_as(NOBODY, NOBODY, talk(s.path)) == {"errors": ["access-denied"]}


@pytest.mark.kvm
def test_vmm_with_a_read_only_socket() -> None:
    with short_tmpdir() as tmp:
        main, ro = os.path.join(tmp, "vm.sock"), os.path.join(tmp, "ro.sock")
        argv = [*VMIPC, "vmm", "--guest", "builtin", "--memory", "64M"]
        argv += ["--console", os.path.join(tmp, "console.txt"), "--no-console-input"]
        argv += ["--socket", main, "--readonly-socket", ro]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not (os.path.exists(main) and os.path.exists(ro)):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the VMM did not create its sockets"
                time.sleep(0.01)
            with SyncClient(ro) as monitor:
                assert monitor.query_status()["state"] == "running"
                for refused in (monitor.pause, monitor.quit):
                    with pytest.raises(CommandError) as info:
                        refused()
                    assert info.value.code == "not-permitted"
                with os.fdopen(os.open(os.devnull, os.O_WRONLY), "wb") as sink:
                    with pytest.raises(CommandError) as info:
                        monitor.dump_memory(out=sink)
                    assert info.value.code == "not-permitted"
                assert monitor.query_status()["state"] == "running"
            with SyncClient(main) as control:
                control.pause()
                assert control.query_status()["state"] == "paused"
                control.quit()
            assert proc.wait(timeout=15) == 0
            # both sockets removed on the way out, from inside the sandbox
            assert sorted(os.listdir(tmp)) == ["console.txt"]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


@needs_root
@pytest.mark.kvm
def test_vmm_opens_the_read_only_socket_to_other_uids_and_groups() -> None:
    with short_tmpdir() as tmp:
        os.chmod(tmp, 0o755)  # let other users reach the socket files
        main, ro = os.path.join(tmp, "vm.sock"), os.path.join(tmp, "ro.sock")
        argv = [*VMIPC, "vmm", "--guest", "builtin", "--memory", "64M"]
        argv += ["--console", os.path.join(tmp, "console.txt"), "--no-console-input"]
        argv += ["--socket", main, "--readonly-socket", ro, "--readonly-socket-group", "nogroup"]
        argv += ["--readonly-socket-mode", "0666", "--readonly-allow-uid", "nobody"]
        argv += ["--readonly-allow-gid", "4242"]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not (os.path.exists(main) and os.path.exists(ro)):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the VMM did not create its sockets"
                time.sleep(0.01)
            st = os.stat(ro)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o666, NOBODY)  # nogroup
            hello = {"hello": load_schema().version}
            assert in_child_as(NOBODY, NOBODY, talk(ro)) == hello  # --readonly-allow-uid
            assert in_child_as(4000, 4242, talk(ro)) == hello  # --readonly-allow-gid
            assert in_child_as(4001, NOBODY, talk(ro)) == hello  # the socket's group
            # the file is open to all (0666), the peer check is not
            assert in_child_as(4002, 4002, talk(ro)) == {"errors": ["access-denied"]}
            # the control socket is still the VMM's own (0600)
            refused = in_child_as(NOBODY, NOBODY, talk(main))
            assert isinstance(refused, dict) and "PermissionError" in refused["exception"]
            with SyncClient(main) as control:
                control.quit()
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--readonly-allow-uid", "no-such-user-here"], "no such user: no-such-user-here"),
        (["--readonly-socket-group", "no-such-group-here"], "no such group: no-such-group-here"),
        (["--readonly-socket-mode", "0999"], "not an octal mode"),
        (["--readonly-max-connections", "0"], "must be 1 or more"),
        (["--readonly-idle-timeout", "-1"], "must be 0 or more"),
    ],
)
def test_bad_read_only_socket_options_are_one_line_and_exit_2(
    options: list[str], message: str
) -> None:
    with short_tmpdir() as tmp:
        argv = [*VMIPC, "vmm", "--socket", os.path.join(tmp, "vm.sock")]
        argv += ["--readonly-socket", os.path.join(tmp, "ro.sock"), *options]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert message in done.stderr
        assert os.listdir(tmp) == []


def test_read_only_socket_options_need_the_read_only_socket() -> None:
    with short_tmpdir() as tmp:
        argv = [*VMIPC, "vmm", "--socket", os.path.join(tmp, "vm.sock")]
        argv += ["--readonly-allow-uid", "0"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert done.stderr.strip() == "vmipc vmm: --readonly-allow-uid goes with --readonly-socket"
