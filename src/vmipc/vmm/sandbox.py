"""Capability mode: after start-up the VMM can no longer open, create or remove paths.

The Capsicum idea on Linux. Once everything the VMM needs from the filesystem is open
(``/dev/kvm``, the guest image, the console, a snapshot to restore, the control sockets),
:func:`enter_capability_mode` locks the process down:

* ``PR_SET_NO_NEW_PRIVS`` -- no exec can ever grant privileges again (and it lets an
  unprivileged process install the filters below);
* a **Landlock** ruleset that handles every filesystem right the kernel knows (ABI 1..7:
  execute, read, write, list, create, remove, rename/link, truncate, device ioctls) and
  grants none, so every later ``open()``/``mkdir()``/``unlink()``/``bind()`` of a path
  fails with ``EACCES``. The one exception, when asked for: removing files beneath the
  control sockets' directories (``REMOVE_FILE`` only), so the server can unlink its socket
  on the way out. From ABI 4 TCP ``bind``/``connect`` are denied too, from ABI 6 signals
  to processes outside the sandbox and connecting to abstract UNIX sockets;
* a **seccomp** filter (x86-64) that refuses what a VMM never does after start-up:
  creating or connecting sockets, exec, ptrace and cross-process memory access,
  namespaces, mounts, module loading, kexec, BPF, perf, io_uring, userfaultfd, keyrings,
  file handles.

File descriptors opened before keep working (Landlock checks rights when a file is
opened): KVM ioctls on ``/dev/kvm`` and the VM and vCPU fds, the memfd, a snapshot mapped
copy-on-write, the console, and every fd a client passes later.

Landlock and ``no_new_privs`` restrict the calling thread and the threads it creates
afterwards, not threads already running (``LANDLOCK_RESTRICT_SELF_TSYNC`` arrives with
ABI 8). So this must run in the main thread while it is the only thread: before the vCPU
threads, trio's worker threads or any helper thread start. It checks that and refuses
otherwise.

Python imports modules lazily; a module first imported after this call cannot be read.
The caller imports everything the VMM will run first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "SandboxError",
    "SandboxReport",
    "enter_capability_mode",
    "landlock_abi",
]

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

# system call numbers: Landlock's are the same on every architecture
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_SECCOMP_X86_64 = 317

_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39

# <linux/landlock.h>
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_RESTRICT_SELF_TSYNC = 1 << 3  # ABI 8

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_ABI1 = (1 << 13) - 1

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

#: struct landlock_ruleset_attr { u64 handled_access_fs, handled_access_net, scoped; }
_RULESET_ATTR = struct.Struct("=QQQ")
#: struct landlock_path_beneath_attr { u64 allowed_access; s32 parent_fd; } (packed)
_PATH_BENEATH_ATTR = struct.Struct("=Qi")


def handled_fs_rights(abi: int) -> int:
    """Every filesystem right Landlock ABI ``abi`` knows (so that none is left unhandled)."""
    rights = _FS_ABI1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class SandboxError(Exception):
    """Capability mode could not be entered (one line: what failed and why)."""


@dataclass(frozen=True)
class SandboxReport:
    """What :func:`enter_capability_mode` put in place."""

    no_new_privs: bool
    #: the Landlock ABI enforced, or 0 when the kernel has no Landlock (nothing enforced)
    landlock_abi: int
    #: why Landlock is not enforced, when it is not
    landlock_missing: str | None
    #: True when the seccomp filter is installed
    seccomp: bool
    seccomp_missing: str | None
    #: directories beneath which files may still be removed (the control sockets')
    removable_dirs: tuple[str, ...] = field(default=())

    @property
    def filesystem_locked(self) -> bool:
        return self.landlock_abi > 0

    def describe(self) -> str:
        parts = ["no_new_privs" if self.no_new_privs else "no no_new_privs"]
        if self.landlock_abi:
            parts.append(f"Landlock ABI {self.landlock_abi}")
        else:
            parts.append(f"no Landlock ({self.landlock_missing})")
        parts.append("seccomp" if self.seccomp else f"no seccomp ({self.seccomp_missing})")
        return ", ".join(parts)


def _call(number: int, *args: int | None) -> tuple[int, int]:
    """Issue a raw system call; (result, errno)."""
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = _syscall(ctypes.c_long(number), *converted)
    return int(result), ctypes.get_errno() if result < 0 else 0


def landlock_abi() -> tuple[int, str | None]:
    """The kernel's Landlock ABI version, or (0, why) when Landlock is unavailable."""
    abi, err = _call(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi >= 0:
        return abi, None
    if err == errno.ENOSYS:
        return 0, "the kernel was built without Landlock"
    if err == errno.EOPNOTSUPP:
        return 0, "Landlock is disabled on this kernel (boot parameter lsm=)"
    return 0, f"landlock_create_ruleset: {os.strerror(err)}"


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1  # no procfs: trust the caller


def _set_no_new_privs() -> None:
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def no_new_privs() -> bool:
    """Whether the calling thread has ``no_new_privs`` set."""
    return bool(_prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1)


def _restrict_landlock(abi: int, removable_dirs: Sequence[str]) -> None:
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(_RULESET_ATTR.pack(handled_fs_rights(abi), net, scoped))
    ruleset, err = _call(_SYS_LANDLOCK_CREATE_RULESET, ctypes.addressof(attr), size, 0)
    if ruleset < 0:
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for directory in removable_dirs:
            try:
                dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise SandboxError(f"cannot open {directory}: {exc.strerror}") from None
            try:
                rule = ctypes.create_string_buffer(_PATH_BENEATH_ATTR.pack(FS_REMOVE_FILE, dirfd))
                result, err = _call(
                    _SYS_LANDLOCK_ADD_RULE,
                    ruleset,
                    _LANDLOCK_RULE_PATH_BENEATH,
                    ctypes.addressof(rule),
                    0,
                )
            finally:
                os.close(dirfd)
            if result < 0:
                raise SandboxError(f"landlock_add_rule({directory}): {os.strerror(err)}")
        flags = _LANDLOCK_RESTRICT_SELF_TSYNC if abi >= 8 else 0
        result, err = _call(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, flags)
        if result < 0:
            raise SandboxError(f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)


# --- seccomp ---------------------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06

#: struct seccomp_data: nr at 0, arch at 4, args[0] (low half, little-endian) at 16
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16

#: x86-64 system calls the VMM never makes once running: refused with EPERM
DENIED_SYSCALLS_X86_64 = {
    "socket": 41,  # accept4 and socketpair stay allowed
    "connect": 42,
    "bind": 49,
    "listen": 50,
    "execve": 59,
    "ptrace": 101,
    "mknod": 133,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "mknodat": 259,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "open_tree": 428,
    "move_mount": 429,
}
_SYS_CLONE = 56
_SYS_CLONE3 = 435  # its flags are behind a pointer: ENOSYS makes libc fall back to clone
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x7E000000 | 0x00000080


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """The BPF filter (struct sock_filter[]): allow everything but the denied calls."""
    denied = sorted(DENIED_SYSCALLS_X86_64.values())
    deny_eperm = _RET_ERRNO | errno.EPERM
    # layout: [arch check][nr load][x32 check][one jeq per denied][clone3][clone][allow]
    #         [deny][enosys][clone flags check]
    prog: list[bytes] = []
    prog.append(_insn(_BPF_LD_W_ABS, _OFF_ARCH))
    prog.append(_insn(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, jt=1, jf=0))
    prog.append(_insn(_BPF_RET_K, deny_eperm))  # another ABI (i386 int 0x80): refused
    prog.append(_insn(_BPF_LD_W_ABS, _OFF_NR))
    jumps = len(denied) + 3  # x32 check, the denied, clone3, clone
    allow_at = 4 + jumps  # index of the ALLOW return
    deny_at = allow_at + 1
    enosys_at = deny_at + 1
    clone_at = enosys_at + 1

    def to(target: int) -> int:
        offset = target - (len(prog) + 1)
        assert 0 <= offset < 256
        return offset

    prog.append(_insn(_BPF_JGE_K, _X32_SYSCALL_BIT, jt=to(deny_at)))
    for number in denied:
        prog.append(_insn(_BPF_JEQ_K, number, jt=to(deny_at)))
    prog.append(_insn(_BPF_JEQ_K, _SYS_CLONE3, jt=to(enosys_at)))
    prog.append(_insn(_BPF_JEQ_K, _SYS_CLONE, jt=to(clone_at)))
    assert len(prog) == allow_at
    prog.append(_insn(_BPF_RET_K, _RET_ALLOW))
    prog.append(_insn(_BPF_RET_K, deny_eperm))
    prog.append(_insn(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS))
    prog.append(_insn(_BPF_LD_W_ABS, _OFF_ARG0))
    prog.append(_insn(_BPF_JSET_K, _CLONE_NAMESPACE_FLAGS, jt=0, jf=1))
    prog.append(_insn(_BPF_RET_K, deny_eperm))
    prog.append(_insn(_BPF_RET_K, _RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp() -> str | None:
    """Install the filter on every thread; None, or why it was not installed."""
    if platform.machine() != "x86_64":
        return f"no filter for {platform.machine()}"
    code = seccomp_program()
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    result, err = _call(
        _SYS_SECCOMP_X86_64,
        _SECCOMP_SET_MODE_FILTER,
        _SECCOMP_FILTER_FLAG_TSYNC,
        ctypes.addressof(fprog),
    )
    if result == 0:
        return None
    if result > 0:
        raise SandboxError(f"seccomp: thread {result} could not be synchronised")
    if err in (errno.EINVAL, errno.ENOSYS):
        return f"seccomp filters are not supported ({os.strerror(err)})"
    raise SandboxError(f"seccomp: {os.strerror(err)}")


# --- entry -----------------------------------------------------------------------------------


def enter_capability_mode(*, removable_dirs: Sequence[str] = ()) -> SandboxReport:
    """Lock this process down for good (see the module docstring); returns what was done.

    ``removable_dirs``: directories beneath which files may still be removed (the control
    sockets' directories, so the server can unlink its sockets when it stops).

    Raises :class:`SandboxError` if another thread is already running or a step fails;
    a kernel without Landlock or seccomp is not an error: the report says what is missing.
    """
    threads = _thread_count()
    if threads != 1:
        raise SandboxError(
            f"{threads} threads are running: capability mode must be entered while the "
            "main thread is the only one (Landlock restricts threads created afterwards)"
        )
    _set_no_new_privs()
    abi, missing = landlock_abi()
    if abi > 0:
        _restrict_landlock(abi, [os.path.abspath(d) for d in removable_dirs])
    seccomp_missing = _install_seccomp()
    return SandboxReport(
        no_new_privs=no_new_privs(),
        landlock_abi=abi,
        landlock_missing=missing,
        seccomp=seccomp_missing is None,
        seccomp_missing=seccomp_missing,
        removable_dirs=tuple(os.path.abspath(d) for d in removable_dirs) if abi > 0 else (),
    )
