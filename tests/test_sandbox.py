"""Capability mode (vmipc.vmm.sandbox): in a forked child, and around real VMMs.

The in-process tests enter the sandbox in a forked child (it cannot be left again) and
report back through a pipe: paths cannot be opened, created or removed any more, from the
main thread or from a thread started afterwards, while fds opened before keep working,
KVM included. The VMM tests run ``vmipc vmm`` (sandboxed by default) and check from
outside that every building block and sequence still works.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


# --- real VMMs ----------------------------------------------------------------------------

VMIPC = [sys.executable, "-m", "vmipc"]
