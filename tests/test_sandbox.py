"""Capability mode (vmipc.vmm.sandbox): in a forked child, and around real VMMs.

The in-process tests enter the sandbox in a forked child (it cannot be left again) and
report back through a pipe: paths cannot be opened, created or removed any more, from the
main thread or from a thread started afterwards, while fds opened before keep working,
KVM included; root's powers that are not about paths (capabilities, pushing keystrokes
into the terminal, reaching other processes of its uid, the host's clock and names, a
file's attributes) are gone. The VMM tests run ``vmipc vmm`` (sandboxed by default) and
check from outside that every building block and sequence still works.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import struct
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
            # a harmless call the allow-list leaves out: refused, and the process goes on
            "getppid": raw(110),
        }

    got = in_sandboxed_child(body)
    assert got["thread"] and got["no_new_privs"]
    assert got["socket"] == got["exec"] == got["unshare"] == got["getppid"] == "EPERM"


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
        "(running with no_new_privs, no capabilities, no Landlock (the kernel was built "
        "without Landlock), seccomp allow-list)"
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
    program = sandbox.seccomp_program(os.getpid())  # assembling checks every jump's reach
    assert len(program) % 8 == 0 and len(program) // 8 < 4096  # BPF_MAXINSNS
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if header.exists():  # the numbers are the kernel's
        numbers = {
            name: int(number)
            for _, name, number in (
                line.split() for line in header.read_text().splitlines() if "__NR_" in line
            )
        }
        for name, number in sandbox.ALLOWED_SYSCALLS_X86_64.items():
            assert numbers[f"__NR_{name}"] == number, name
    assert sandbox.handled_fs_rights(1) == (1 << 13) - 1
    assert sandbox.handled_fs_rights(7) == (1 << 16) - 1


# --- root's powers that are not about paths ----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

TIOCSTI = 0x5412
TIOCLINUX = 0x541C


def raw(number: int, *args: int | bytes | None) -> str:
    """Issue system call ``number``: 'ok', or the errno name it failed with."""
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if _libc.syscall(ctypes.c_long(number), *converted) >= 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), "?")


def status_fields(text: str) -> dict[str, str]:
    return {
        key: value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if value
    }


def test_capabilities_are_all_dropped() -> None:
    """The VMM runs as root: in capability mode it keeps none of root's capabilities (a
    status fd opened before reads them, since /proc cannot be opened any more)."""
    fds: dict[str, int] = {}

    def before() -> None:
        fds["status"] = os.open("/proc/self/status", os.O_RDONLY)

    def body() -> dict[str, str]:
        fields = status_fields(os.pread(fds["status"], 65536, 0).decode())
        return {key: fields[key] for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}

    got = in_sandboxed_child(body, before=before)
    assert got == dict.fromkeys(got, "0000000000000000"), got


@pytest.fixture
def stranger() -> Any:
    """A process of the same user (root) outside the sandbox."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_no_power_over_other_processes_or_the_host(tmp_path: Path, stranger: Any) -> None:
    """What root may do without a path, to processes of its own uid and to the host: all
    refused. Harmless when it does work: the calls set what is set already (the host name,
    the time of day to now) or touch a throwaway process and file."""
    import resource
    import stat as stat_module

    target = stranger.pid
    owned = tmp_path / "root-owned"
    owned.write_text("")
    owned.chmod(0o600)
    names: dict[str, bytes] = {}

    def before() -> None:
        names["host"] = os.uname().nodename.encode()
        names["domain"] = Path("/proc/sys/kernel/domainname").read_bytes().strip()

    def now() -> bytes:
        return struct.pack("=qq", *divmod(time.time_ns(), 1_000_000_000))

    def fork() -> None:
        if os.fork() == 0:
            os._exit(0)
        os.wait()

    def body() -> dict[str, str]:
        own_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        return {
            "prlimit64-get": attempt(lambda: resource.prlimit(target, resource.RLIMIT_NOFILE)),
            "prlimit64-set": attempt(
                lambda: resource.prlimit(target, resource.RLIMIT_CORE, (0, 0))
            ),
            "setpriority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, target, 5)),
            "kill": attempt(lambda: os.kill(target, 0)),
            "syslog": raw(103, 10, None, 0),  # SYSLOG_ACTION_SIZE_BUFFER
            "iopl": raw(172, 3),
            "ioperm": raw(173, 0x80, 1, 1),
            "settimeofday": raw(164, None, None),
            "clock_settime": raw(227, 0, now()),  # CLOCK_REALTIME
            "adjtimex": raw(159, ctypes.create_string_buffer(256)),  # modes 0: a query
            "sethostname": raw(170, names["host"], len(names["host"])),
            "setdomainname": raw(171, names["domain"], len(names["domain"])),
            # Landlock has no right for a file's attributes: the owner (root) may change them
            "chmod": attempt(lambda: os.chmod(owned, 0o4777)),
            "chown": attempt(lambda: os.chown(owned, -1, 1)),
            "utime": attempt(lambda: os.utime(owned, (0, 0))),
            "setxattr": attempt(lambda: os.setxattr(owned, "user.vmipc", b"x")),
            "fork": attempt(fork),
            "own-limits": "ok" if resource.getrlimit(resource.RLIMIT_NOFILE) == own_limit else "?",
        }

    got = in_sandboxed_child(body, before=before)
    assert got.pop("own-limits") == "ok"
    assert got == dict.fromkeys(got, "EPERM"), got
    after = owned.stat()
    assert stat_module.S_IMODE(after.st_mode) == 0o600 and after.st_gid == 0
    assert after.st_mtime > 0


def _in_a_terminal_session(body: Callable[[int, int], Any], **options: Any) -> tuple[Any, bytes]:
    """A shell's situation: a session whose controlling terminal is a new pty (raw mode,
    no echo), and in it a child (not the session leader, like a VMM started from the shell)
    that enters capability mode and runs ``body(tty_fd, stat_fd)`` (its /proc/self/stat,
    opened before). The child first pushes b"b" into the terminal's input with TIOCSTI, as
    root may before capability mode. Returns
    what ``body`` returned and the bytes the terminal's reader (the shell) would read."""
    import fcntl
    import tty

    master, slave = os.openpty()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the session leader: takes the pty as its controlling terminal
        code = 1
        try:
            os.close(r)
            os.close(master)
            os.setsid()
            fcntl.ioctl(slave, 0x540E, 0)  # TIOCSCTTY
            tty.setraw(slave)

            fds: list[int] = []

            def inject_before() -> None:
                fcntl.ioctl(slave, TIOCSTI, b"b")
                fds.append(os.open("/proc/self/stat", os.O_RDONLY))

            try:
                value: Any = in_sandboxed_child(
                    lambda: body(slave, fds[0]), before=inject_before, **options
                )
            except AssertionError as exc:
                value = {"failed": str(exc)}
            os.set_blocking(slave, False)
            typed = b""
            with contextlib.suppress(BlockingIOError):
                typed = os.read(slave, 100)
            os.write(w, json.dumps({"value": value, "typed": typed.decode()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(slave)
    try:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
        os.close(master)
    outcome = json.loads(data)
    return outcome["value"], outcome["typed"].encode()


def _tty_attacks(tty_fd: int, stat_fd: int) -> dict[str, Any]:
    import fcntl

    fields = os.pread(stat_fd, 4096, 0).decode().rpartition(")")[2].split()
    return {
        "TIOCSTI": attempt(lambda: fcntl.ioctl(tty_fd, TIOCSTI, b"x")),
        "TIOCSTI-stdin": attempt(lambda: fcntl.ioctl(0, TIOCSTI, b"x")) if os.isatty(0) else "-",
        "TIOCLINUX": attempt(lambda: fcntl.ioctl(tty_fd, TIOCLINUX, b"\x06\x00")),
        "tty_nr": int(fields[4]),  # the controlling terminal (0: none)
    }


@pytest.mark.parametrize("keep_terminal", [False, True])
def test_keystrokes_cannot_be_pushed_into_the_terminal(keep_terminal: bool) -> None:
    """TIOCSTI on the controlling terminal would type commands into the shell that started
    the VMM, run outside the sandbox as root. Capability mode gives the terminal up (unless
    console input is forwarded from it: ``keep_terminal``), drops CAP_SYS_ADMIN (needed for
    TIOCSTI on another terminal) and the seccomp filter refuses TIOCSTI and TIOCLINUX."""
    got, typed = _in_a_terminal_session(_tty_attacks, keep_terminal=keep_terminal)
    assert typed == b"b", "the test's setup: root could push keystrokes before"
    assert got["TIOCSTI"] == got["TIOCLINUX"] == "EPERM", got
    assert got["TIOCSTI-stdin"] in ("EPERM", "-"), got
    assert (got["tty_nr"] != 0) == keep_terminal, got


def test_a_socket_directory_the_vmm_could_not_write_without_capabilities(
    tmp_path: Path,
) -> None:
    """Root without CAP_DAC_OVERRIDE cannot remove a file from a directory that is not
    writable for it by its mode: the report names such a socket directory (the VMM warns:
    its socket file will be left behind), one root owns is fine."""
    others, ours = tmp_path / "others", tmp_path / "ours"
    for directory in (others, ours):
        directory.mkdir(mode=0o755)
        (directory / "vm.sock").write_text("")
    os.chown(others, 65534, 65534)
    tmp_path.chmod(0o755)

    def body() -> dict[str, Any]:
        return {
            "others": attempt(lambda: os.unlink(others / "vm.sock")),
            "ours": attempt(lambda: os.unlink(ours / "vm.sock")),
        }

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            report = enter_capability_mode(removable_dirs=[str(others), str(ours)])
            result = {"unremovable": list(report.unremovable_dirs), **body()}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    os.waitpid(pid, 0)
    got = json.loads(data or b"{}")
    assert got == {"unremovable": [str(others)], "others": "EACCES", "ours": "ok"}


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


CONFINEMENT = ("NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def confinement(vmm: VmmProcess) -> set[tuple[str, ...]]:
    """The CONFINEMENT fields of every thread of a VMM. Asked once it answers: the socket
    appears just before the VMM enters capability mode (it answers only after)."""
    assert vmm.state() is not None
    found = set()
    tasks = os.listdir(f"/proc/{vmm.pid}/task")
    assert len(tasks) > 1  # the vCPU threads at least
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            text = Path(f"/proc/{vmm.pid}/task/{task}/status").read_text()
            fields = status_fields(text)
            found.add(tuple(fields[name] for name in CONFINEMENT))
    return found


#: no_new_privs set, seccomp in filter mode, no capability left (not even to bound an exec)
CONFINED = {("1", "2", *["0" * 16] * 5)}


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
        assert {fields[:2] for fields in confinement(free)} == {("0", "0")}


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


#: a shell's part: take the pty on fd 0 as the controlling terminal of a new session, start
#: the VMM in it (not the session leader), tell its pid on the fd argv[1], wait for it
_SESSION = (
    "import fcntl, os, subprocess, sys\n"
    "fcntl.ioctl(0, 0x540E, 0)\n"  # TIOCSCTTY
    "vmm = subprocess.Popen(sys.argv[2:])\n"
    "os.write(int(sys.argv[1]), str(vmm.pid).encode())\n"
    "os.close(int(sys.argv[1]))\n"
    "sys.exit(vmm.wait())\n"
)


@pytest.mark.parametrize("console_input", [False, True])
def test_a_vmm_keeps_its_controlling_terminal_only_to_read_console_input(
    guests: Path, console_input: bool
) -> None:
    """Started from a shell on a terminal, the VMM gives the terminal up once in capability
    mode, unless it forwards console input from it (then the seccomp filter is what keeps
    it from pushing keystrokes into the shell: see the in-process tests above)."""
    from vmipc.client import SyncClient

    master, slave = os.openpty()
    r, w = os.pipe()
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "vm.sock")
        argv = [*VMIPC, "vmm", "--bootsector", str(guests / "hello-bootsector.bin")]
        argv += ["--socket", path, "--paused"]  # paused: nothing on the console
        if not console_input:
            argv.append("--no-console-input")
        session = subprocess.Popen(
            [sys.executable, "-c", _SESSION, str(w), *argv],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            pass_fds=(w,),
            start_new_session=True,
        )
        os.close(w)
        os.close(slave)
        vmm_pid = 0
        try:
            vmm_pid = int(os.read(r, 100) or b"0")
            deadline = time.monotonic() + 20
            while not os.path.exists(path):
                assert session.poll() is None and time.monotonic() < deadline, "no VMM"
                time.sleep(0.01)
            with SyncClient(path, timeout=20) as client:  # it answers: it is sandboxed
                assert client.query_status()["state"] == "paused"
                stat = Path(f"/proc/{vmm_pid}/stat").read_text().rpartition(")")[2].split()
                client.quit()
            assert session.wait(timeout=20) == 0
        finally:
            if session.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(vmm_pid, 9)
                session.kill()
                session.wait()
            os.close(r)
            os.close(master)
    assert session.stderr is not None
    assert session.stderr.read() == b""
    assert (int(stat[4]) != 0) == console_input  # tty_nr: the controlling terminal


def test_a_socket_directory_root_may_not_write_without_capabilities_is_warned_about(
    guests: Path,
) -> None:
    """The VMM (root) binds its socket in a directory of another user, which it may not
    write once its capabilities are gone: it says so at start, in one line, and runs; at
    quit the socket file stays behind, as the warning said."""
    from vmipc.client import SyncClient

    with short_tmpdir() as tmp:
        theirs = os.path.join(tmp, "theirs")
        os.mkdir(theirs, 0o755)
        os.chown(theirs, 65534, 65534)
        os.chmod(tmp, 0o755)
        path = os.path.join(theirs, "vm.sock")
        argv = [*VMIPC, "vmm", "--bootsector", str(guests / "hello-bootsector.bin")]
        proc = subprocess.Popen(
            [*argv, "--socket", path, "--paused", "--no-console-input"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(path):
                assert proc.poll() is None and time.monotonic() < deadline, "no VMM"
                time.sleep(0.01)
            with SyncClient(path, timeout=20) as client:
                client.quit()
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert err.decode().splitlines() == [
            f"vmipc: warning: uid 0 without capabilities may not remove files in {theirs}: "
            "its socket file will be left behind when the VMM quits (give the directory to "
            "uid 0)"
        ]
        assert os.listdir(theirs) == ["vm.sock"]


def test_the_lease_calls_are_allowed_for_this_process_and_its_lease_signal_only(
    tmp_path: Path, stranger: Any
) -> None:
    """A restore into a running VMM leases a passed snapshot file in capability mode
    (``ReadLease.take_passed``): fcntl's lease commands are allowed with exactly the
    arguments it uses. Its signal cannot be pointed at another process, nor another signal
    chosen, nor a write lease taken."""
    import fcntl

    from vmipc.vmm.filelease import LEASE_SIGNAL

    snapshot = tmp_path / "snap"
    snapshot.write_bytes(b"x" * 4096)
    opened: dict[str, int] = {}

    def before() -> None:
        opened["fd"] = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)

    def body() -> dict[str, str]:
        fd = opened["fd"]
        return {
            "setown-other": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETOWN, stranger.pid)),
            "setown-group": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETOWN, -os.getpgrp())),
            "setsig-other": attempt(lambda: fcntl.fcntl(fd, 10, signal.SIGUSR1)),
            "write-lease": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)),
            "setown-self": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())),
            "setsig-lease": attempt(lambda: fcntl.fcntl(fd, 10, LEASE_SIGNAL)),
            "read-lease": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)),
            "held": "ok" if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK else "no",
            "unlock": attempt(lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)),
        }

    got = in_sandboxed_child(body, before=before)
    refused = ("setown-other", "setown-group", "setsig-other", "write-lease")
    assert {name: got.pop(name) for name in refused} == dict.fromkeys(refused, "EPERM")
    assert got == dict.fromkeys(got, "ok"), got
