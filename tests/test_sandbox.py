"""Capability mode (vmipc.vmm.sandbox): in a forked child, and around real VMMs.

The in-process tests enter the sandbox in a forked child (it cannot be left again) and
report back through a pipe: paths cannot be opened, created or removed any more, from the
main thread or from a thread started afterwards, while fds opened before keep working,
KVM included. The VMM tests run ``vmipc vmm`` (sandboxed by default) and check from
outside that every building block and sequence still works.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.control_support import short_tmpdir
from tests.seq_support import VCPUS, WS, VmmProcess, check_continuation, vmipc, vmm_processes
from vmipc.vmm import sandbox
from vmipc.vmm.sandbox import SandboxError, enter_capability_mode

pytestmark = pytest.mark.kvm

ABI, MISSING = sandbox.landlock_abi()
needs_landlock = pytest.mark.skipif(ABI == 0, reason=f"no Landlock: {MISSING}")


def in_sandboxed_child(
    body: Callable[[], Any], *, before: Callable[[], Any] | None = None, **options: Any
) -> Any:
    """Fork; in the child run ``before()``, enter capability mode, run ``body()``; return
    what ``body`` returned (JSON), or raise what it raised as an AssertionError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            if before is not None:
                before()
            report = enter_capability_mode(**options)
            result = {"report": report.describe(), "value": body()}
        except BaseException as exc:
            result = {"exception": f"{type(exc).__name__}: {exc}"}
            code = 1
        try:
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    outcome = json.loads(b"".join(chunks) or b"{}")
    assert "exception" not in outcome and status == 0, outcome
    return outcome["value"]


def attempt(operation: Callable[[], object]) -> str:
    """'ok', or the errno name an OSError carried."""
    try:
        operation()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def path_operations(tmp: str) -> dict[str, str]:
    """Try everything a sandboxed VMM must not do with paths; name -> outcome."""
    existing = os.path.join(tmp, "existing")
    return {
        "read": attempt(lambda: os.close(os.open(existing, os.O_RDONLY))),
        "write": attempt(lambda: os.close(os.open(existing, os.O_WRONLY))),
        "create": attempt(lambda: os.close(os.open(os.path.join(tmp, "new"), os.O_CREAT, 0o600))),
        "mkdir": attempt(lambda: os.mkdir(os.path.join(tmp, "dir"))),
        "unlink": attempt(lambda: os.unlink(existing)),
        "rename": attempt(lambda: os.rename(existing, existing + ".moved")),
        "list": attempt(lambda: os.listdir(tmp)),
        "etc": attempt(lambda: os.close(os.open("/etc/passwd", os.O_RDONLY))),
        "proc": attempt(lambda: os.close(os.open("/proc/self/status", os.O_RDONLY))),
        "dev-kvm": attempt(lambda: os.close(os.open("/dev/kvm", os.O_RDWR))),
        "bind-unix": attempt(lambda: _bind_unix(os.path.join(tmp, "s"))),
    }


def _bind_unix(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)


DENIED = {"EACCES", "EPERM"}
VMIPC = [sys.executable, "-m", "vmipc"]
GUEST = ["--guest", "builtin", "--vcpus", str(VCPUS), "--memory", "64M", "--guest-opt", f"ws={WS}"]


@needs_landlock
def test_paths_are_refused_in_the_main_thread_and_in_later_threads(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "existing").write_text("kept")
    fds: dict[str, int] = {}

    def open_before() -> None:
        fds["read"] = os.open(tmp_path / "existing", os.O_RDONLY)
        fds["write"] = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def body() -> dict[str, Any]:
        main = path_operations(tmp)
        in_thread: dict[str, str] = {}
        worker = threading.Thread(target=lambda: in_thread.update(path_operations(tmp)))
        worker.start()
        worker.join()
        # fds opened before still read and write
        data = os.pread(fds["read"], 100, 0).decode()
        written = os.write(fds["write"], b"written inside\n")
        return {"main": main, "thread": in_thread, "data": data, "written": written}

    got = in_sandboxed_child(body, before=open_before)
    for where in ("main", "thread"):
        refused = {name: outcome for name, outcome in got[where].items() if outcome in DENIED}
        assert refused == got[where], f"{where}: allowed {set(got[where]) - set(refused)}"
    assert got["data"] == "kept" and got["written"] == 15
    assert (tmp_path / "existing").read_text() == "kept"  # nothing removed or renamed
    assert (tmp_path / "log").read_text() == "written inside\n"
    assert sorted(os.listdir(tmp_path)) == ["existing", "log"]


@needs_landlock
def test_files_may_be_removed_beneath_the_socket_directories_only(tmp_path: Path) -> None:
    sockets, other = tmp_path / "run", tmp_path / "other"
    for directory in (sockets, other):
        directory.mkdir()
        (directory / "vm.sock").write_text("")

    def body() -> dict[str, str]:
        return {
            "socket-dir": attempt(lambda: os.unlink(sockets / "vm.sock")),
            "other-dir": attempt(lambda: os.unlink(other / "vm.sock")),
            "create-in-socket-dir": attempt(
                lambda: os.close(os.open(sockets / "new", os.O_CREAT | os.O_WRONLY, 0o600))
            ),
        }

    got = in_sandboxed_child(body, removable_dirs=[str(sockets)])
    assert got["socket-dir"] == "ok"
    assert got["other-dir"] in DENIED and got["create-in-socket-dir"] in DENIED
    assert not (sockets / "vm.sock").exists() and (other / "vm.sock").exists()


def _unshare_user_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")


def test_the_seccomp_filter_refuses_what_a_running_vmm_never_does() -> None:
    def body() -> dict[str, Any]:
        started: list[bool] = []
        worker = threading.Thread(target=lambda: started.append(True))  # clone3 -> clone
        worker.start()
        worker.join()
        pair = socket.socketpair()  # trio's wakeup pipe: still allowed
        pair[0].close()
        pair[1].close()
        return {
            "thread": started == [True],
            "socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "exec": attempt(lambda: os.execv("/bin/true", ["true"])),
            "unshare": attempt(_unshare_user_namespace),
            "no_new_privs": sandbox.no_new_privs(),
        }

    got = in_sandboxed_child(body)
    assert got["thread"] and got["no_new_privs"]
    assert got["socket"] == got["exec"] == got["unshare"] == "EPERM"


def test_kvm_keeps_working() -> None:
    """As in the VMM: /dev/kvm opened and a guest built before; the guest runs after. A
    machine built afterwards (an incoming VMM's) uses a duplicate of the /dev/kvm fd:
    KVM_CREATE_VM, KVM_CREATE_VCPU, the memfd and KVM_RUN all work in capability mode."""
    from vmipc.kvm import Kvm
    from vmipc.vmm.machine import BootSource, Machine, MachineConfig

    console: list[bytes] = []
    held: dict[str, Any] = {}

    def before() -> None:
        held["kvm"] = Kvm()
        guest = BootSource("builtin", guest_options=(("passes", "1"), ("ws", "65536")))
        held["booted"] = Machine(MachineConfig(16 << 20, 2, guest), console.append)

    def body() -> dict[str, Any]:
        booted = held["booted"]
        booted.start()
        state = booted.wait_stopped(30)
        booted.close()
        empty = MachineConfig(16 << 20, 2, BootSource("none"))
        later = Machine(empty, console.append, kvm=held["kvm"].dup())
        later.start(paused=True)
        later_state = later.state.value
        later.close()
        return {
            "state": state.value if state else None,
            "console": b"".join(console).decode(),
            "later": later_state,
        }

    got = in_sandboxed_child(body, before=before)
    assert got["state"] == "shutdown" and got["later"] == "paused"
    assert "vcpu=0 done" in got["console"] and "vcpu=1 done" in got["console"]


def test_a_kernel_without_landlock_still_gets_no_new_privs_and_seccomp(tmp_path: Path) -> None:
    (tmp_path / "existing").write_text("")

    def pretend() -> None:
        sandbox.landlock_abi = lambda: (0, "the kernel was built without Landlock")

    def body() -> dict[str, Any]:
        return {
            "read": attempt(lambda: os.close(os.open(tmp_path / "existing", os.O_RDONLY))),
            "socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "no_new_privs": sandbox.no_new_privs(),
        }

    got = in_sandboxed_child(body, before=pretend)
    assert got == {"read": "ok", "socket": "EPERM", "no_new_privs": True}


def test_without_landlock_the_vmm_warns_and_runs(guests: Path) -> None:
    code = (
        "import sys, vmipc.vmm.sandbox as s\n"
        "s.landlock_abi = lambda: (0, 'the kernel was built without Landlock')\n"
        "from vmipc.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    hello = str(guests / "hello-bootsector.bin")
    done = subprocess.run(
        [sys.executable, "-c", code, "vmm", "--bootsector", hello],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from the boot sector\n"
    assert done.stderr.splitlines() == [
        "vmipc: warning: the kernel was built without Landlock: the VMM can still open paths "
        "(running with no_new_privs, no Landlock (the kernel was built without Landlock), "
        "seccomp)"
    ]


def test_entering_with_another_thread_running_is_refused() -> None:
    stop = threading.Event()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            threading.Thread(target=stop.wait, daemon=True).start()
            try:
                enter_capability_mode()
                os.write(w, b"entered")
            except SandboxError as exc:
                os.write(w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    message = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert "2 threads are running" in message


def test_seccomp_program_shape() -> None:
    program = sandbox.seccomp_program()
    assert len(program) % 8 == 0 and len(program) // 8 < 256
    assert sandbox.handled_fs_rights(1) == (1 << 13) - 1
    assert sandbox.handled_fs_rights(7) == (1 << 16) - 1


# --- a command handler in capability mode -------------------------------------------------

OPEN_SCHEMA = {
    "commands": [
        {
            "name": "test-open",
            "since": "1.0",
            "doc": "Try to open a path (what a handler in capability mode cannot do).",
            "args": [
                {"name": "path", "type": "string", "doc": "The path."},
                {"name": "in_thread", "type": "bool", "doc": "From a worker thread."},
            ],
            "fds": [],
            "result": {"type": "map", "fields": []},
            "states": "any",
            "errors": ["io-error"],
            "cancellable": False,
            "progress": False,
        }
    ]
}


async def _test_open(ctx: Any) -> dict[str, Any]:
    import trio

    from vmipc.protocol import CommandError, ErrorCode

    path = ctx.args["path"]
    try:
        if ctx.args["in_thread"]:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        else:
            fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CommandError(
            ErrorCode.IO_ERROR,
            f"cannot open {path}: {exc.strerror}",
            {"errno": errno.errorcode.get(exc.errno or 0, "?")},
        ) from None
    os.close(fd)
    return {}


def test_a_handler_that_opens_a_path_fails_cleanly_and_the_server_carries_on() -> None:
    """A server (over a stand-in machine) in capability mode, in a forked child: a handler
    that tries to open a path gets EACCES, from the trio thread and from a worker thread,
    and answers with a clean error; the server goes on answering, and removes its socket
    file when it quits."""
    import trio

    from tests.control_support import RecordingMachine
    from vmipc.client import CommandError, SyncClient
    from vmipc.commands import HandlerEntry, load_handlers
    from vmipc.protocol import load_schema
    from vmipc.server import Server

    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "vm.sock")
        handlers = {**load_handlers(), "test-open": HandlerEntry("test-open", _test_open, False)}
        server = Server(
            RecordingMachine(), schema=load_schema().extended(OPEN_SCHEMA), handlers=handlers
        )
        pid = os.fork()
        if pid == 0:  # the child: bind, enter capability mode, serve until quit
            code = 1
            try:
                server.bind(path)
                enter_capability_mode(removable_dirs=[tmp])
                trio.run(server.serve)
                code = 0
            finally:
                os._exit(code)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            secret = os.path.join(tmp, "secret")
            with open(secret, "w") as f:
                f.write("not for the VMM")
            with SyncClient(path) as client:
                for in_thread in (False, True):
                    for target in (secret, "/etc/passwd", "/dev/kvm"):
                        with pytest.raises(CommandError) as refused:
                            client.call("test-open", path=target, in_thread=in_thread)
                        assert refused.value.code == "io-error"
                        assert refused.value.details["errno"] in DENIED, refused.value
                        assert "Permission denied" in str(refused.value)
                assert client.query_status()["state"] == "running"
                client.quit()
            _, status = os.waitpid(pid, 0)
            pid = 0
            assert status == 0
            assert os.listdir(tmp) == ["secret"], "the socket file was left behind"
        finally:
            if pid:
                os.kill(pid, 9)
                os.waitpid(pid, 0)


# --- real VMMs ----------------------------------------------------------------------------


def confinement(vmm: VmmProcess) -> set[tuple[str, str]]:
    """(NoNewPrivs, Seccomp) of every thread of a VMM. Asked once it answers: the socket
    appears just before the VMM enters capability mode (it answers only after)."""
    assert vmm.state() is not None
    found = set()
    for task in os.listdir(f"/proc/{vmm.pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = dict(
                line.split(":\t", 1)
                for line in Path(f"/proc/{vmm.pid}/task/{task}/status").read_text().splitlines()
                if ":\t" in line
            )
            found.add((fields["NoNewPrivs"].strip(), fields["Seccomp"].strip()))
    return found


CONFINED = {("1", "2")}  # no_new_privs set, seccomp in filter mode


def test_a_vmm_is_sandboxed_by_default_and_not_with_no_sandbox(guests: Path) -> None:
    hello = str(guests / "hello-bootsector.bin")
    quiet = subprocess.run(
        [*VMIPC, "vmm", "--bootsector", hello], capture_output=True, text=True, timeout=30
    )
    assert quiet.returncode == 0
    assert quiet.stdout == "hello from the boot sector\n"  # the console is a pre-opened fd
    assert quiet.stderr == ""  # capability mode is the quiet default
    loose = subprocess.run(
        [*VMIPC, "vmm", "--no-sandbox", "--bootsector", hello],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert loose.returncode == 0 and loose.stdout == quiet.stdout
    assert "warning: the sandbox is off (--no-sandbox)" in loose.stderr
    with vmm_processes() as vmms:
        confined = vmms.guest("confined")
        free = vmms._start("free", [*GUEST, "--no-sandbox"], [])
        confined.wait_for_passes(1)
        free.wait_for_passes(1)
        assert confinement(confined) == CONFINED  # every thread, vCPUs included
        assert confinement(free) == {("0", "0")}


def test_building_blocks_through_passed_fds_into_a_sandboxed_incoming_vmm(
    tmp_path: Path,
) -> None:
    """dump-state and dump-memory to fds the client passes (a file and a pipe), load-state
    and load-memory from them into an ``--incoming`` VMM that built its machine after it
    entered capability mode: the guest continues exactly."""
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming(memory=None)  # the machine is built by load-state, sandboxed
        src.wait_for_passes(2)
        with src.client() as source, dst.client() as target:
            source.pause()
            with open(tmp_path / "state", "w+b") as state:
                source.dump_state(out=state.fileno())
                state.seek(0)
                assert target.load_state(in_=state.fileno())["vcpus"] == VCPUS
            reader, writer = os.pipe()
            received: list[dict[str, Any]] = []
            loader = threading.Thread(
                target=lambda: received.append(_load_memory(dst.socket, reader))
            )
            loader.start()
            source.dump_memory(out=writer)
            os.close(writer)
            loader.join(30)
            os.close(reader)
            assert received and received[0]["data_pages"] > 0, received
            source.quit()
            target.resume()
        assert src.wait_exit() == 0
        dst.wait_for_passes(max(src.passes().values()) + 2)
        with dst.client() as target:
            target.pause()
        check_continuation(src.text(), dst.text())
        assert confinement(dst) == CONFINED


def _load_memory(socket_path: str, fd: int) -> dict[str, Any]:
    from vmipc.client import SyncClient

    with SyncClient(socket_path, timeout=30) as client:
        return dict(client.load_memory(in_=fd))


def test_suspend_restore_and_migrate_with_the_sandbox_on(tmp_path: Path) -> None:
    """suspend to a file; ``vmipc vmm --restore FILE`` (opened before capability mode,
    mapped lazily); migrate to an ``--incoming`` VMM: the guest goes on exactly through
    three sandboxed VMMs."""
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        first = vmms.guest("first")
        first.wait_for_passes(2)
        suspended = vmipc("suspend", "--socket", first.socket, str(snap))
        assert suspended.returncode == 0, suspended.stderr
        assert first.wait_exit() == 0
        second = vmms._start("second", ["--restore", str(snap)], [])
        second.wait_for_passes(max(first.passes().values()) + 1)
        third = vmms.incoming("third")
        assert confinement(second) == confinement(third) == CONFINED
        moved = vmipc("migrate", "--socket", second.socket, "--to", third.socket)
        assert moved.returncode == 0, moved.stderr
        assert second.wait_exit() == 0
        third.wait_for_passes(max(second.passes().values()) + 2)
        with third.client() as client:
            client.pause()
        check_continuation(first.text() + second.text(), third.text())
        for vmm in (first, second, third):
            assert "warning" not in vmm.stderr.read_text()
        third.stop()
        left = [name for name in os.listdir(os.path.dirname(third.socket)) if ".sock" in name]
        assert left == [], "socket files were left behind"
