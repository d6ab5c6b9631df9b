"""Capability mode: after start-up the VMM keeps only the fds it holds.

The Capsicum idea on Linux. Once everything the VMM needs from the filesystem is open
(``/dev/kvm``, the guest image, the console, a snapshot to restore, the control sockets),
:func:`enter_capability_mode` locks the process down:

* the **controlling terminal** is given up (``TIOCNOTTY``) unless console input is read
  from it: a process may push keystrokes (``TIOCSTI``) into its own controlling terminal
  without any capability, and the shell that started the VMM would run them;
* ``PR_SET_NO_NEW_PRIVS`` -- no exec can ever grant privileges again (and it lets a
  process without ``CAP_SYS_ADMIN`` install the filters below);
* **every capability is dropped**: effective, permitted, inheritable, ambient and the
  bounding set. The VMM typically runs as root; once ``/dev/kvm`` is open it needs none
  (KVM ioctls, mmap, the memfd, sockets already bound, passed fds need no capability).
  Root without capabilities is a plain user that owns root's files: the file-mode checks
  apply to it, and what root may do to processes and files of its own uid without a
  capability is what the two filters below take away;
* a **Landlock** ruleset that handles every filesystem right the kernel knows (ABI 1..7:
  execute, read, write, list, create, remove, rename/link, truncate, device ioctls) and
  grants none, so every later ``open()``/``mkdir()``/``unlink()``/``bind()`` of a path
  fails with ``EACCES``. The one exception, when asked for: removing files beneath the
  control sockets' directories (``REMOVE_FILE`` only), so the server can unlink its socket
  on the way out. From ABI 4 TCP ``bind``/``connect`` are denied too, from ABI 6 signals
  to processes outside the sandbox and connecting to abstract UNIX sockets;
* a **seccomp allow-list** (x86-64): the system calls a running VMM makes, and no other
  (``EPERM``, never a kill: a call that was missed fails like any refused call). Some are
  allowed only with certain arguments: ``ioctl`` for KVM's and a few harmless fd ioctls
  (never ``TIOCSTI``/``TIOCLINUX``), ``clone`` for threads only, ``kill``/``tgkill`` to
  this process only, ``prlimit64`` on this process only, ``fcntl`` and ``prctl`` for a
  few harmless commands (and ``fcntl``'s read lease on a passed snapshot file, its
  signal going to this process only). Landlock does not cover a file's attributes (``chmod``,
  ``chown``, ``utimes``, extended attributes), which root may change on root's files
  without a capability: none of those calls is on the list.

File descriptors opened before keep working (Landlock checks rights when a file is
opened): KVM ioctls on ``/dev/kvm`` and the VM and vCPU fds, the memfd, a snapshot mapped
copy-on-write, the console, and every fd a client passes later.

Landlock, ``no_new_privs`` and capabilities belong to a thread and are inherited by the
threads it creates afterwards, not by threads already running (Landlock's
``LANDLOCK_RESTRICT_SELF_TSYNC`` arrives with ABI 8). So this must run in the main thread
while it is the only thread: before the vCPU threads, trio's worker threads or any helper
thread start. It checks that and refuses otherwise.

Python imports modules lazily; a module first imported after this call cannot be read.
The caller imports everything the VMM will run first.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmipc.errors import VmipcError
from vmipc.vmm.filelease import LEASE_SIGNAL

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


class SandboxError(VmipcError):
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
    #: of those, the ones whose mode does not let this process, without capabilities,
    #: remove a file (the socket file will be left behind)
    unremovable_dirs: tuple[str, ...] = field(default=())
    #: False when the bounding set could not be emptied (a process without CAP_SETPCAP);
    #: effective, permitted, inheritable and ambient capabilities are always dropped
    bounding_set_cleared: bool = True
    #: the controlling terminal: 'none', 'given up', or 'kept: why'
    terminal: str = "none"

    @property
    def filesystem_locked(self) -> bool:
        return self.landlock_abi > 0

    def describe(self) -> str:
        parts = ["no_new_privs" if self.no_new_privs else "no no_new_privs"]
        parts.append(
            "no capabilities" if self.bounding_set_cleared else "no capabilities but a bounding set"
        )
        if self.landlock_abi:
            parts.append(f"Landlock ABI {self.landlock_abi}")
        else:
            parts.append(f"no Landlock ({self.landlock_missing})")
        parts.append(
            "seccomp allow-list" if self.seccomp else f"no seccomp ({self.seccomp_missing})"
        )
        if self.terminal.startswith("kept"):
            parts.append(f"controlling terminal {self.terminal}")
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


# --- the controlling terminal ----------------------------------------------------------------

_TIOCNOTTY = 0x5422


def _give_up_terminal(keep: bool) -> str:
    """Stop having a controlling terminal, unless ``keep`` or this process leads its
    session; what became of it: 'none', 'given up', or 'kept: why' (the report says it)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return "none"  # ENXIO: no controlling terminal
    try:
        if keep:
            return "kept: console input is read from it"
        if os.getsid(0) == os.getpid():
            # a session leader that gives its terminal up hangs up the session's
            # foreground jobs (itself, usually): keep it, the seccomp filter holds TIOCSTI
            return "kept: the VMM leads its session"
        fcntl.ioctl(fd, _TIOCNOTTY)
    except OSError as exc:
        raise SandboxError(f"cannot give up the controlling terminal: {exc.strerror}") from None
    finally:
        os.close(fd)
    return "given up"


# --- capabilities ----------------------------------------------------------------------------

_SYS_CAPGET = 125
_SYS_CAPSET = 126
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: struct __user_cap_header_struct { u32 version; int pid; }
_CAP_HEADER = struct.Struct("=Ii")
#: struct __user_cap_data_struct { u32 effective, permitted, inheritable; } [2]
_CAP_DATA = struct.Struct("=6I")


def _capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    header = ctypes.create_string_buffer(_CAP_HEADER.pack(_LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(_CAP_DATA.size)
    result, err = _call(_SYS_CAPGET, ctypes.addressof(header), ctypes.addressof(data))
    if result < 0:
        raise SandboxError(f"capget: {os.strerror(err)}")
    eff0, prm0, inh0, eff1, prm1, inh1 = _CAP_DATA.unpack(data.raw)
    return eff0 | eff1 << 32, prm0 | prm1 << 32, inh0 | inh1 << 32


def _drop_capabilities() -> bool:
    """Drop every capability of the calling thread (and so of the threads it creates):
    the bounding set first (that needs CAP_SETPCAP, which goes last), then the ambient
    set, then effective, permitted and inheritable. Returns whether the bounding set is
    now empty: a process without CAP_SETPCAP cannot empty it (harmless here: the bounding
    set only limits what an exec could grant, and no exec is possible)."""
    bounding_cleared = True
    cap = 0
    while True:
        held = _prctl(_PR_CAPBSET_READ, cap, 0, 0, 0)
        if held < 0:
            break  # EINVAL: past the kernel's last capability
        if held == 1 and _prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EPERM:
                raise SandboxError(f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
            bounding_cleared = False
        cap += 1
    if _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # a kernel before 4.3 has no ambient set
            raise SandboxError(f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(err)}")
    header = ctypes.create_string_buffer(_CAP_HEADER.pack(_LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(bytes(_CAP_DATA.size))
    result, err = _call(_SYS_CAPSET, ctypes.addressof(header), ctypes.addressof(data))
    if result < 0:
        raise SandboxError(f"capset: {os.strerror(err)}")
    if _capabilities() != (0, 0, 0):
        raise SandboxError("capset: capabilities are left after dropping them all")
    return bounding_cleared


def _unremovable(directories: Sequence[str]) -> tuple[str, ...]:
    """The directories in which this process, as it is now (without capabilities), cannot
    remove a file: root without CAP_DAC_OVERRIDE needs write and search permission by the
    directory's mode like anyone else (a directory of another user, say)."""
    return tuple(d for d in directories if not os.access(d, os.W_OK | os.X_OK, effective_ids=True))


# --- seccomp ---------------------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
#: what a call that is not on the list gets: EPERM, never a kill, so that a call missed
#: here fails like any refused call (the VMM reports it) instead of killing the VMM
_RET_REFUSED = _RET_ERRNO | errno.EPERM

_BPF_LD_W_ABS = 0x20
_BPF_ALU_AND_K = 0x54
_BPF_JEQ_K = 0x15
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06

#: struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the low 32 bits first on
#: little-endian x86-64; every argument checked here is an int, which the kernel truncates
#: to those 32 bits, so they are all that matters)
_OFF_NR, _OFF_ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


#: x86-64 system calls a running VMM makes, allowed whatever their arguments. Found by
#: tracing sandboxed VMMs (``strace -f``, from the moment the filter is installed) through
#: the test suite's scenarios -- boot, pause/resume, checkpoint, suspend, restore, migrate,
#: incremental snapshots, the read-only socket, load, quit -- and by running them under
#: this filter in log mode (SECCOMP_RET_LOG) to catch any call left out. CPython, trio,
#: msgpack and xxhash are in those traces. Landlock still answers for paths: ``openat``
#: is allowed so that an open fails with EACCES (Python's linecache and lazy imports try);
#: ``unlink`` removes the socket files at quit (beneath their directories only).
ALLOWED_SYSCALLS_X86_64 = {
    # fds
    "read": 0,
    "write": 1,
    "pread64": 17,
    "pwrite64": 18,
    # the block device reads straight into guest RAM (os.preadv: glibc calls preadv2)
    "preadv": 295,
    "preadv2": 327,
    "fdatasync": 75,  # the block device's flush
    "lseek": 8,  # also SEEK_DATA/SEEK_HOLE over the memfd
    "sendfile": 40,
    "copy_file_range": 326,  # dump-disk: the image into the snapshot file in the kernel
    "ftruncate": 77,
    "fallocate": 285,  # punching holes into the memfd
    "close": 3,
    "memfd_create": 319,  # an incoming VMM builds its machine later
    "newfstatat": 262,  # fstat(), lstat() (glibc 2.33 and later)
    "fstat": 5,  # the same, from an older glibc
    "lstat": 6,
    "stat": 4,
    "openat": 257,
    "unlink": 87,
    # waiting
    "poll": 7,
    "epoll_create1": 291,
    "epoll_ctl": 233,
    "epoll_wait": 232,
    "futex": 202,
    "nanosleep": 35,  # time.sleep(), and glibc's sleeps
    "clock_nanosleep": 230,
    "sched_yield": 24,
    # sockets already bound, and the ones accepted or passed
    "accept4": 288,
    "socketpair": 53,  # trio's wake-up socket
    "sendto": 44,
    "recvfrom": 45,
    "recvmsg": 47,  # requests, with their fds
    "shutdown": 48,
    "getsockname": 51,
    "getsockopt": 55,  # SO_PEERCRED
    "setsockopt": 54,  # the buffer sizes of an accepted socket
    # memory
    "mmap": 9,
    "munmap": 11,
    "mremap": 25,
    "mprotect": 10,
    "madvise": 28,
    "brk": 12,
    # signals (to this process: kill and tgkill are checked below)
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "rt_sigreturn": 15,
    "rt_sigtimedwait": 128,  # the snapshot lease's watcher (vmm/filelease.py)
    "restart_syscall": 219,  # an interrupted sleep resumed (vCPU threads are kicked)
    # threads (clone is checked below)
    "set_robust_list": 273,
    "rseq": 334,
    "exit": 60,
    "exit_group": 231,
    # questions with harmless answers; the clocks are vDSO calls that become system
    # calls when the clock source cannot be read from user space
    "getpid": 39,
    "gettid": 186,
    "getuid": 102,
    "geteuid": 107,
    "getgid": 104,
    "getegid": 108,
    "getrandom": 318,
    "clock_gettime": 228,
    "clock_getres": 229,
    "gettimeofday": 96,
    "time": 201,
}

#: allowed with certain arguments only (checked in :func:`seccomp_program`)
_SYS_IOCTL = 16
_SYS_FCNTL = 72
_SYS_CLONE = 56
_SYS_CLONE3 = 435  # its flags are behind a pointer: ENOSYS makes libc fall back to clone
_SYS_KILL = 62
_SYS_TGKILL = 234
_SYS_PRLIMIT64 = 302
_SYS_SCHED_GETAFFINITY = 204  # glibc's malloc, sizing its arenas in a new thread
_SYS_PRCTL = 157

#: ioctl type byte of every KVM ioctl (``_IO(0xAE, ...)``, linux/kvm.h)
_KVM_IOCTL_TYPE = 0xAE
#: other ioctls: isatty (TCGETS), bytes waiting (FIONREAD), what CPython uses for
#: setblocking (FIONBIO) and set_inheritable (FIOCLEX, FIONCLEX). Not TIOCSTI, which pushes
#: input into a terminal, nor TIOCLINUX, nor anything else.
ALLOWED_IOCTLS = {
    "TCGETS": 0x5401,
    "FIONREAD": 0x541B,
    "FIONBIO": 0x5421,
    "FIONCLEX": 0x5450,
    "FIOCLEX": 0x5451,
}
#: fcntl commands: dup (os.dup), fd and status flags (os.set_blocking, the passed fds'
#: checks), and whether the snapshot's lease is being broken; not F_SETOWN_EX, notifications
#: or locks. The lease a restore into a running VMM takes on a passed snapshot file
#: (``ReadLease.take_passed``) is allowed by :data:`ALLOWED_FCNTL_ARGS`, with its argument
#: checked.
ALLOWED_FCNTLS = {
    "F_GETFD": 1,
    "F_SETFD": 2,
    "F_GETFL": 3,
    "F_SETFL": 4,
    "F_DUPFD_CLOEXEC": 1030,
    "F_GETLEASE": 1025,  # a question: the snapshot lease's watcher (vmm/filelease.py)
}
#: fcntl commands allowed with these arguments only: a read lease (taken, and given up),
#: its break announced with the lease signal, to this process alone (``None``: the pid,
#: known when the filter is made) -- never to another process, which F_SETOWN could name
ALLOWED_FCNTL_ARGS: dict[str, tuple[int, tuple[int | None, ...]]] = {
    "F_SETLEASE": (1024, (0, 2)),  # F_RDLCK, F_UNLCK
    "F_SETSIG": (10, (int(LEASE_SIGNAL),)),
    "F_SETOWN": (8, (None,)),
}
#: prctl options: a thread's name (trio names its worker threads), and a question
ALLOWED_PRCTLS = {
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_NO_NEW_PRIVS": 39,
}
_CLONE_THREAD = 0x00010000
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x7E000000 | 0x00000080


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


class _Assembler:
    """Classic BPF with labels: a jump names its targets, :meth:`assemble` resolves them."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, str | None, str | None]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        assert name not in self._labels
        self._labels[name] = len(self._code)

    def stmt(self, code: int, k: int) -> None:
        self._code.append((code, k, None, None))

    def jump(self, code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        """Jump to label ``jt`` if the test holds, to ``jf`` if not (None: the next)."""
        self._code.append((code, k, jt, jf))

    def assemble(self) -> bytes:
        out = []
        for index, (code, k, jt, jf) in enumerate(self._code):
            offsets = []
            for target in (jt, jf):
                offset = 0 if target is None else self._labels[target] - (index + 1)
                if not 0 <= offset < 256:
                    raise AssertionError(f"BPF jump of {offset} from {index} to {target}")
                offsets.append(offset)
            out.append(_insn(code, k, *offsets))
        return b"".join(out)


def seccomp_program(pid: int) -> bytes:
    """The BPF filter (struct sock_filter[]) for process ``pid``: the allow-list.

    The calls with argument checks come first, ``ioctl`` first of all (``KVM_RUN`` is the
    VMM's most frequent call). Every other allowed call depends on its number only, so
    the kernel's seccomp action cache lets it through without running the filter."""
    a = _Assembler()
    a.stmt(_BPF_LD_W_ABS, _OFF_ARCH)
    a.jump(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, jf="refuse")  # i386 int 0x80: nothing allowed
    a.stmt(_BPF_LD_W_ABS, _OFF_NR)  # x32 numbers (bit 30 set) match nothing below
    checked = {
        _SYS_IOCTL: "ioctl",
        _SYS_CLONE: "clone",
        _SYS_CLONE3: "enosys",
        _SYS_KILL: "this-process",
        _SYS_TGKILL: "this-process",
        _SYS_PRLIMIT64: "this-process-or-0",
        _SYS_SCHED_GETAFFINITY: "this-process-or-0",
        _SYS_FCNTL: "fcntl",
        _SYS_PRCTL: "prctl",
    }
    for number, check in checked.items():
        a.jump(_BPF_JEQ_K, number, jt=check)
    for number in sorted(ALLOWED_SYSCALLS_X86_64.values()):
        a.jump(_BPF_JEQ_K, number, jt="allow")
    a.label("refuse")
    a.stmt(_BPF_RET_K, _RET_REFUSED)
    a.label("allow")
    a.stmt(_BPF_RET_K, _RET_ALLOW)
    a.label("enosys")
    a.stmt(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS)

    def one_of(label: str, arg: int, values: Sequence[int]) -> None:
        a.label(label)
        a.stmt(_BPF_LD_W_ABS, _arg(arg))
        for value in values:
            a.jump(_BPF_JEQ_K, value, jt="allow-2")
        a.stmt(_BPF_RET_K, _RET_REFUSED)

    a.label("ioctl")
    a.stmt(_BPF_LD_W_ABS, _arg(1))  # the request: an unsigned int
    for value in ALLOWED_IOCTLS.values():
        a.jump(_BPF_JEQ_K, value, jt="allow-2")
    a.stmt(_BPF_ALU_AND_K, 0xFF00)
    a.jump(_BPF_JEQ_K, _KVM_IOCTL_TYPE << 8, jt="allow-2")
    a.stmt(_BPF_RET_K, _RET_REFUSED)
    a.label("clone")
    a.stmt(_BPF_LD_W_ABS, _arg(0))  # the flags (all in the low 32 bits for clone)
    a.jump(_BPF_JSET_K, _CLONE_NAMESPACE_FLAGS, jt="refuse-2")
    a.jump(_BPF_JSET_K, _CLONE_THREAD, jt="allow-2")  # a thread; never a new process
    a.label("refuse-2")
    a.stmt(_BPF_RET_K, _RET_REFUSED)
    one_of("this-process", 0, [pid])
    one_of("this-process-or-0", 0, [pid, 0])
    a.label("fcntl")
    a.stmt(_BPF_LD_W_ABS, _arg(1))  # the command
    for value in ALLOWED_FCNTLS.values():
        a.jump(_BPF_JEQ_K, value, jt="allow-2")
    for name, (command, _) in ALLOWED_FCNTL_ARGS.items():
        a.jump(_BPF_JEQ_K, command, jt=f"fcntl-{name}")
    a.stmt(_BPF_RET_K, _RET_REFUSED)
    for name, (_, values) in ALLOWED_FCNTL_ARGS.items():
        one_of(f"fcntl-{name}", 2, [pid if value is None else value for value in values])
    one_of("prctl", 0, list(ALLOWED_PRCTLS.values()))
    a.label("allow-2")
    a.stmt(_BPF_RET_K, _RET_ALLOW)
    return a.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp() -> str | None:
    """Install the filter on every thread; None, or why it was not installed."""
    if platform.machine() != "x86_64":
        return f"no filter for {platform.machine()}"
    code = seccomp_program(os.getpid())
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


def enter_capability_mode(
    *, removable_dirs: Sequence[str] = (), keep_terminal: bool = False
) -> SandboxReport:
    """Lock this process down for good (see the module docstring); returns what was done.

    ``removable_dirs``: directories beneath which files may still be removed (the control
    sockets' directories, so the server can unlink its sockets when it stops).
    ``keep_terminal``: keep the controlling terminal (console input is read from it);
    otherwise it is given up.

    Raises :class:`SandboxError` if another thread is already running or a step fails;
    a kernel without Landlock or seccomp is not an error: the report says what is missing.
    """
    threads = _thread_count()
    if threads != 1:
        raise SandboxError(
            f"{threads} threads are running: capability mode must be entered while the "
            "main thread is the only one (Landlock restricts threads created afterwards)"
        )
    directories = tuple(os.path.abspath(d) for d in removable_dirs)
    # in this order: /dev/tty can be opened only before Landlock; the bounding set can be
    # emptied only while CAP_SETPCAP is held; the socket directories are checked once the
    # capabilities are gone, so that the check sees what the server will face at quit
    terminal = _give_up_terminal(keep_terminal)
    _set_no_new_privs()
    bounding_set_cleared = _drop_capabilities()
    unremovable = _unremovable(directories)
    abi, missing = landlock_abi()
    if abi > 0:
        _restrict_landlock(abi, directories)
    seccomp_missing = _install_seccomp()
    return SandboxReport(
        no_new_privs=no_new_privs(),
        landlock_abi=abi,
        landlock_missing=missing,
        seccomp=seccomp_missing is None,
        seccomp_missing=seccomp_missing,
        removable_dirs=directories if abi > 0 else (),
        unremovable_dirs=unremovable,
        bounding_set_cleared=bounding_set_cleared,
        terminal=terminal,
    )
