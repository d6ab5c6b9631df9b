#!/usr/bin/env python3
"""How fast does the VMM dump guest memory, and what does one dirty-log scan cost?

Prints Markdown tables of medians with ratios against baselines measured in the same run,
so a noisy shared machine affects both sides alike:

1. ``dump-memory`` throughput — GB/s of guest RAM (guest size / wall time of the call) and
   the bytes written — for 1 GiB and 4 GiB built-in guests, mostly touched and mostly zero,
   in both formats (``stream``, ``raw``), into a regular file, a pipe and a socket, beside

   * the kernel copy ceiling: the fastest plain copy of the same bytes (the guest's own
     memfd, reopened through /proc) to the same kind of destination, and
   * QEMU + KVM saving the same built-in guest, stopped, to a passed fd (QMP ``getfd`` +
     ``migrate fd:``);

2. the cost of one dirty-log scan of a 1 GiB and an 8 GiB guest, idle and dirtying:
   ``Machine.dirty_log.fetch()``, ``Machine.dirty_log.query()`` and ``bitmap_to_runs`` over
   the result, beside the bare ``KVM_GET_DIRTY_LOG`` ioctls and the floor of looking at the
   bits in Python (``int.from_bytes(bitmap).bit_count()``).

The VMM under test is ``python -m vmipc vmm --socket`` in its own process, driven by the
blocking client, as users run it. Run: ``.venv/bin/python benchmarks/bench_dump.py
[--quick] [--json FILE] [--no-qemu]``. The default run takes 4-5 minutes; ``--quick``
(512 MiB guests, fewer repetitions) under a minute. It needs a usable /dev/kvm (as root).
QEMU is installed with ``tools/install-system-deps`` when missing; its column is skipped,
with a note, when it still cannot boot the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    QemuFailed,
    QmpConnection,
    gbps,
    median,
    note_repeated,
    progress,
    qemu_or_note,
    ratio,
    say,
    say_notes,
    table,
    tail,
    wait_for,
    write_json,
)

from vmipc.client import SyncClient
from vmipc.formats import bitmap_to_runs
from vmipc.guest import BUILTIN_GUEST_PATH
from vmipc.memory_layout import PAGE_SIZE
from vmipc.vmm.machine import BootSource, Machine, MachineConfig

MIB = 1 << 20
GIB = 1 << 30
BANNER = b"vmipc-guest "
#: zeros written for holes by the "write every byte" ceilings
ZEROS = bytes(4 * MIB)
#: the largest piece one write/sendfile call of a ceiling is given: into a file 4 MiB (one
#: giant write into the page cache was 2-5x slower here), else 1 GiB (a little faster)
FILE_CALL = 4 * MIB
CALL_MAX = 1 << 30
#: QEMU's migration limits, set before every run: the defaults (128 MiB/s, 300 ms) throttle
#: the copy to 128 MiB/s until little enough is left for one stop-and-copy
QEMU_MAX_BANDWIDTH = 1 << 40
QEMU_DOWNTIME_LIMIT_MS = 2_000_000
QEMU_ATTEMPTS = 3
QEMU_FAILURE_MARKERS = ("KVM internal error", "emulation failure")
DESTINATIONS = ("file", "pipe", "socket")


# --- statistics and output ----------------------------------------------------------------


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def fmt_mib(count: float) -> str:
    return f"{count / MIB:,.0f} MiB" if count >= 10 * MIB else f"{count / MIB:,.2f} MiB"


# --- the guests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestSpec:
    """A built-in guest: ``touched`` guests run vcpus * ws ~ 90 % of RAM for one pass."""

    size: int
    vcpus: int
    ws: str
    touched: bool

    @property
    def label(self) -> str:
        size = f"{self.size // GIB} GiB" if self.size >= GIB else f"{self.size // MIB} MiB"
        return f"{size}, mostly {'touched' if self.touched else 'zero'}"

    @property
    def key(self) -> str:
        return f"{self.size // MIB}M-{'touched' if self.touched else 'zero'}"

    @property
    def options(self) -> str:
        return f"ws={self.ws} rate=0"

    def pass_one_done(self, console: bytes) -> bool:
        return all(f"vcpu={i} pass=1 ".encode() in console for i in range(self.vcpus))


def guest_specs(quick: bool) -> list[GuestSpec]:
    if quick:
        return [GuestSpec(512 * MIB, 2, "230M", True), GuestSpec(512 * MIB, 2, "1M", False)]
    # 4 GiB: RAM is 3 GiB below the 4 GiB hole and 1 GiB above it, and each working set must
    # lie inside one of them, so four vCPUs of 920M (three low, one high)
    return [
        GuestSpec(GIB, 2, "460M", True),
        GuestSpec(GIB, 2, "1M", False),
        GuestSpec(4 * GIB, 4, "920M", True),
        GuestSpec(4 * GIB, 4, "1M", False),
    ]


# --- destinations: the fd handed to the writer, and whatever drains its other end --------


class Destination:
    """One dump's destination. ``open()`` gives the fd for the writer; ``close()`` closes
    this process's copy, waits for the drain and returns the bytes that arrived (for a
    file: the bytes it stores, i.e. its allocated blocks)."""

    kind = ""

    def open(self) -> int:
        raise NotImplementedError

    def close(self) -> int:
        raise NotImplementedError


class FileDestination(Destination):
    """A new regular file in the temporary directory (ext4 here), unlinked afterwards:
    the dump goes to the page cache, it is not fsync'ed."""

    kind = "file"

    def __init__(self, tmp: str) -> None:
        self.path = os.path.join(tmp, "dump.bin")
        self.fd = -1

    def open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        return self.fd

    def close(self) -> int:
        stored = os.fstat(self.fd).st_blocks * 512
        os.close(self.fd)
        os.unlink(self.path)
        return stored


class _Drained(Destination):
    """A pipe or socket whose other end a thread of this process drains."""

    def __init__(self) -> None:
        self.count = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _start(self, drain: Callable[[], None]) -> None:
        self.count = 0
        self.error = None

        def run() -> None:
            try:
                drain()
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _join(self) -> None:
        assert self._thread is not None
        self._thread.join(120)
        if self._thread.is_alive():
            raise RuntimeError(f"the {self.kind}'s writer never closed it (no EOF)")
        if self.error is not None:
            raise RuntimeError(f"draining the {self.kind} failed: {self.error}")


class PipeDestination(_Drained):
    """A pipe (default size, 64 KiB) drained by a thread that splices it to /dev/null:
    pages sent with sendfile pass by reference and are never copied."""

    kind = "pipe"

    def __init__(self) -> None:
        super().__init__()
        self.null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.read_fd = self.write_fd = -1

    def open(self) -> int:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)

        def drain() -> None:
            while True:
                moved = os.splice(self.read_fd, self.null, MIB)
                if not moved:
                    return
                self.count += moved

        self._start(drain)
        return self.write_fd

    def close(self) -> int:
        os.close(self.write_fd)
        try:
            self._join()
        finally:
            os.close(self.read_fd)
        return self.count


class SocketDestination(_Drained):
    """A connected AF_UNIX stream socket pair (default buffers) whose other end a thread
    drains with recv_into, 1 MiB at a time (one copy, as any receiver makes)."""

    kind = "socket"

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray(MIB)
        self.ends: tuple[socket.socket, socket.socket] | None = None

    def open(self) -> int:
        writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ends = (writer, reader)
        view = memoryview(self.buffer)

        def drain() -> None:
            while True:
                got = reader.recv_into(view)
                if not got:
                    return
                self.count += got

        self._start(drain)
        return writer.fileno()

    def close(self) -> int:
        assert self.ends is not None
        writer, reader = self.ends
        writer.close()
        try:
            self._join()
        finally:
            reader.close()
        return self.count


def make_destinations(tmp: str) -> dict[str, Destination]:
    return {"file": FileDestination(tmp), "pipe": PipeDestination(), "socket": SocketDestination()}


# --- vmipc: `vmipc vmm --socket` in its own process ----------------------------------------


class VmipcGuest:
    """The VMM under test, running the built-in guest, paused after its first pass."""

    def __init__(self, spec: GuestSpec, tmp: str) -> None:
        self.spec = spec
        self.socket_path = os.path.join(tmp, "vmipc.sock")
        self.console = Path(tmp) / "vmipc-console.txt"
        self.stderr = Path(tmp) / "vmipc-stderr.txt"
        argv = [sys.executable, "-m", "vmipc", "vmm", "--guest", "builtin"]
        argv += ["--memory", f"{spec.size // MIB}M", "--vcpus", str(spec.vcpus)]
        argv += ["--guest-opt", f"ws={spec.ws}", "--guest-opt", "rate=0"]
        argv += ["--socket", self.socket_path, "--console", str(self.console)]
        argv += ["--no-console-input"]
        self.client: SyncClient | None = None
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err)
        try:
            began = time.monotonic()
            wait_for(self._ready, f"vmipc vmm to finish pass 1 of {spec.label}", 120)
            self.boot_s = time.monotonic() - began
            self.client = SyncClient(self.socket_path, timeout=600, client_name="bench_dump")
            self.client.pause()
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vmipc vmm exited {self.proc.returncode}: {tail(self.stderr)}")
        console = self.console.read_bytes() if self.console.exists() else b""
        return self.spec.pass_one_done(console) and os.path.exists(self.socket_path)

    def dump(self, fmt: str, fd: int) -> tuple[float, dict[str, Any]]:
        assert self.client is not None
        start = time.perf_counter()
        reply = self.client.dump_memory(format=fmt, out=fd)  # type: ignore[arg-type]
        return time.perf_counter() - start, dict(reply)

    def open_memfd(self) -> int | None:
        """This process's own fd on the guest's memfd (reopened through /proc), or None."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        for name in names:
            try:
                if not os.readlink(f"{fd_dir}/{name}").startswith("/memfd:vmipc-guest-ram"):
                    continue
                fd = os.open(f"{fd_dir}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if os.fstat(fd).st_size == self.spec.size:
                return fd
            os.close(fd)
        return None

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.quit()
            self.client.close()
            self.client = None
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the kernel copy ceiling -----------------------------------------------------------------

PWRITE_DATA = "pwrite of the data extents, holes kept"
WRITE_ALL = "write of every byte"


def ceiling_methods(dest: str, touched: bool) -> tuple[str, ...]:
    """The plain copies tried for a destination kind; the ceiling is the fastest. Trial runs
    here: into a pipe, writing every byte lost to sendfile by 2x every time; into a file,
    writing every byte (zeros for the holes) was no faster than the sparse pwrite and
    stores more; into a socket the two swap places from run to run, except for mostly-zero
    guests, where sendfile (which reads holes as zeros) always won."""
    if dest == "file":
        return (PWRITE_DATA,)
    if dest == "socket" and touched:
        return ("sendfile", WRITE_ALL)
    return ("sendfile",)


def write_all(fd: int, view: memoryview, call: int) -> None:
    while view:
        view = view[os.write(fd, view[:call]) :]


class Ceiling:
    """Plain copies of a memfd's bytes. Holes are never read through the mapping (a read
    fault on a shmem hole allocates a page, which would change the guest's memory file):
    the write copies write zeros from a buffer for them, sendfile reads them as zeros."""

    def __init__(self, fd: int, size: int, synthetic: bool) -> None:
        self.fd, self.size, self.synthetic = fd, size, synthetic
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view = memoryview(self._map)

    @classmethod
    def synthetic_like(cls, spec: GuestSpec) -> Ceiling:
        """When the guest's memfd cannot be opened: one of the same size, with pseudo-random
        bytes over the working sets' share of it (mostly touched) or its first 4 MiB."""
        fd = os.memfd_create("bench-ceiling", os.MFD_CLOEXEC)
        os.ftruncate(fd, spec.size)
        block = os.urandom(4 * MIB)
        filled = spec.size * 9 // 10 if spec.touched else 4 * MIB
        for offset in range(0, filled, len(block)):
            os.pwrite(fd, block[: filled - offset], offset)
        return cls(fd, spec.size, synthetic=True)

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)

    def pieces(self) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) covering the file, from SEEK_DATA / SEEK_HOLE."""
        out: list[tuple[int, int, bool]] = []
        position = 0
        while position < self.size:
            try:
                data = os.lseek(self.fd, position, os.SEEK_DATA)
            except OSError:
                data = self.size
            if data > position:
                out.append((position, data - position, False))
            if data >= self.size:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            out.append((data, hole - data, True))
            position = hole
        return out

    def data_bytes(self) -> int:
        return sum(length for _, length, data in self.pieces() if data)

    def copy(self, method: str, out: int, call: int) -> float:
        """Copy every byte to ``out`` with ``method``, at most ``call`` bytes a call."""
        start = time.perf_counter()
        if method == "sendfile":
            offset = 0
            while offset < self.size:
                offset += os.sendfile(out, self.fd, offset, min(self.size - offset, call))
        elif method.startswith("pwrite"):
            for offset, length, data in self.pieces():
                if data:
                    view = self.view[offset : offset + length]
                    done = 0
                    while done < length:
                        done += os.pwrite(out, view[done : done + call], offset + done)
            os.ftruncate(out, self.size)
        else:
            zeros = memoryview(ZEROS)
            for offset, length, data in self.pieces():
                if data:
                    write_all(out, self.view[offset : offset + length], call)
                    continue
                for at in range(0, length, len(ZEROS)):
                    write_all(out, zeros[: min(len(ZEROS), length - at)], call)
        return time.perf_counter() - start


# --- QEMU: the same guest, saved with getfd + migrate fd: -----------------------------------


class Qmp(QmpConnection):
    """A QMP connection: commands (with an fd passed by SCM_RIGHTS), events kept aside."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(600)
        sock.connect(path)
        self.events: list[dict[str, Any]] = []
        super().__init__(sock)

    def _event(self, message: dict[str, Any]) -> None:
        self.events.append(message)

    def wait_event(self, name: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name and done(event.get("data", {})):
                    del self.events[: index + 1]
                    return event
            self.events.clear()
            message = self._message()
            if "event" in message:
                self.events.append(message)


class QemuGuest:
    """QEMU + KVM booting the same built-in guest image, stopped after its first pass."""

    def __init__(self, qemu: str, spec: GuestSpec, tmp: str, failures: list[str]) -> None:
        """Launch the first attempt; :meth:`wait_ready` waits for it (and retries)."""
        self.qemu, self.spec, self.tmp, self.failures = qemu, spec, tmp, failures
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.migrated = False
        self.attempt = 0
        self._launch()

    def _launch(self) -> None:
        self.attempt += 1
        spec, tmp = self.spec, self.tmp
        self.serial = Path(tmp) / f"qemu-serial-{self.attempt}.txt"
        self.stderr = Path(tmp) / f"qemu-stderr-{self.attempt}.txt"
        self.qmp_path = os.path.join(tmp, f"qmp-{self.attempt}.sock")
        argv = [self.qemu, "-accel", "kvm", "-m", str(spec.size // MIB)]
        argv += ["-smp", str(spec.vcpus), "-kernel", str(BUILTIN_GUEST_PATH)]
        argv += ["-append", f"vcpus={spec.vcpus} {spec.options}"]
        argv += ["-display", "none", "-serial", f"file:{self.serial}", "-monitor", "none"]
        argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-no-reboot"]
        argv += ["-device", "isa-debug-exit,iobase=0x501,iosize=1"]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )

    def wait_ready(self) -> None:
        """Wait until the guest has done pass 1, then stop it; launch again (up to
        QEMU_ATTEMPTS in all) when KVM's emulator fails under SeaBIOS or it hangs."""
        while True:
            problem = self._await_boot()
            if not problem:
                return
            self.failures.append(problem)
            progress(f"QEMU attempt {self.attempt} for {self.spec.label}: {problem}")
            self.close()
            if self.attempt >= QEMU_ATTEMPTS:
                raise QemuFailed(
                    f"{QEMU_ATTEMPTS} attempts failed in a row, the last: {self.failures[-1]}"
                )
            self._launch()

    def _await_boot(self) -> str:
        spec, serial, stderr = self.spec, self.serial, self.stderr

        def console() -> bytes:
            return serial.read_bytes() if serial.exists() else b""

        def check(want: Callable[[bytes], bool]) -> Callable[[], bool]:
            def ready() -> bool:
                assert self.proc is not None
                errors = stderr.read_text(errors="replace")
                if any(marker in errors for marker in QEMU_FAILURE_MARKERS):
                    raise QemuFailed(f"KVM emulation failure under QEMU ({tail(stderr)})")
                if self.proc.poll() is not None:
                    raise QemuFailed(f"QEMU exited {self.proc.returncode} ({tail(stderr)})")
                return want(console())

            return ready

        try:
            # SeaBIOS runs in KVM's instruction emulator here: several seconds, and now
            # and then it hangs silently
            wait_for(check(lambda out: BANNER in out), "the guest's banner under QEMU", 30, 0.1)
            wait_for(check(spec.pass_one_done), "pass 1 under QEMU", 120, 0.1)
            self.qmp = Qmp(self.qmp_path)
            self.qmp.execute("stop")
            self.qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
            self.qmp.execute(
                "migrate-set-parameters",
                {"max-bandwidth": QEMU_MAX_BANDWIDTH, "downtime-limit": QEMU_DOWNTIME_LIMIT_MS},
            )
        except (QemuFailed, TimeoutError, OSError) as exc:
            return str(exc)
        return ""

    def dump(self, fd: int) -> tuple[float, dict[str, Any]]:
        assert self.qmp is not None
        if self.migrated:
            # QEMU 7.2 refuses a second migration from the post-migrate state: run a moment
            self.qmp.execute("cont")
            self.qmp.execute("stop")
        self.qmp.execute("getfd", {"fdname": "mig"}, fd=fd)
        start = time.perf_counter()
        self.qmp.execute("migrate", {"uri": "fd:mig"})
        event = self.qmp.wait_event(
            "MIGRATION",
            lambda data: data.get("status") in ("completed", "failed", "cancelled"),
        )
        elapsed = time.perf_counter() - start
        self.migrated = True
        info = self.qmp.execute("query-migrate")
        status = event["data"]["status"]
        if status != "completed":
            raise QemuFailed(f"QEMU migration {status}: {info.get('error-desc', info)}")
        return elapsed, {"ram": info.get("ram", {})}

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(OSError):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


# --- 1. dump-memory throughput -----------------------------------------------------------------


@dataclass
class Op:
    """One way of writing the guest's RAM to a destination; ``run(fd)`` returns the
    seconds it took and details for the JSON."""

    dest: str
    name: str
    run: Callable[[int], tuple[float, dict[str, Any]]]


def timed_once(op: Op, dest: Destination) -> tuple[float, int, dict[str, Any]]:
    fd = dest.open()
    try:
        seconds, detail = op.run(fd)
    finally:
        got = dest.close()
    return seconds, got, detail


def bench_guest(
    spec: GuestSpec,
    qemu: str | None,
    rounds: int,
    tmp: str,
    notes: list[str],
    failures: list[str],
) -> tuple[dict[str, Any], bool]:
    """Every op, interleaved round by round; returns the samples and whether QEMU worked."""
    tmp = tempfile.mkdtemp(prefix=f"{spec.key}-", dir=tmp)  # no stale sockets or consoles
    emu: QemuGuest | None = None
    vm: VmipcGuest | None = None
    ceiling: Ceiling | None = None
    qemu_ok = qemu is not None
    try:
        if qemu is not None:
            # QEMU first: its SeaBIOS crawls through KVM's emulator meanwhile
            progress(
                f"{spec.label}: booting QEMU and vmipc vmm ({spec.vcpus} vCPUs, {spec.options})"
            )
            emu = QemuGuest(qemu, spec, tmp, failures)
        else:
            progress(f"{spec.label}: booting vmipc vmm ({spec.vcpus} vCPUs, {spec.options})")
        vm = VmipcGuest(spec, tmp)
        if emu is not None:
            try:
                emu.wait_ready()
            except QemuFailed as exc:
                qemu_ok = False
                notes.append(f"{spec.label}: QEMU column skipped: {exc}")
                emu.close()
                emu = None
        memfd = vm.open_memfd()
        if memfd is None:
            notes.append(
                f"{spec.label}: the guest's memfd could not be opened through /proc: the "
                "ceiling copies a synthetic memfd of the same size and share of data instead"
            )
            ceiling = Ceiling.synthetic_like(spec)
        else:
            ceiling = Ceiling(memfd, spec.size, synthetic=False)
        data_bytes = ceiling.data_bytes()

        ops: list[Op] = []
        for dest in DESTINATIONS:
            for fmt in ("stream", "raw"):
                ops.append(Op(dest, f"vmipc {fmt}", lambda fd, f=fmt: vm.dump(f, fd)))
            call = FILE_CALL if dest == "file" else CALL_MAX
            for method in ceiling_methods(dest, spec.touched):
                kind = method.split()[0]
                ops.append(
                    Op(
                        dest,
                        f"ceiling: {method}",
                        lambda fd, m=kind, c=call: (ceiling.copy(m, fd, c), {}),
                    )
                )
            if emu is not None:
                ops.append(Op(dest, "qemu", emu.dump))
        dests = make_destinations(tmp)
        samples: dict[str, dict[str, dict[str, list[Any]]]] = {
            dest: {
                op.name: {"seconds": [], "bytes": [], "detail": []} for op in ops if op.dest == dest
            }
            for dest in DESTINATIONS
        }
        # round 0 warms up, into a pipe only, which is quick: QEMU's first migration in a
        # process is several times slower than the next ones, and the ceiling's first pass
        # over its mapping of the memfd faults the pages in
        progress(f"{spec.label}: warm-up, then {rounds} rounds over {len(ops)} dumps")
        for index in range(rounds + 1):
            order = DESTINATIONS[index % 3 :] + DESTINATIONS[: index % 3]
            if index == 0:
                order = ("pipe",)
            for dest in order:
                mine = [op for op in ops if op.dest == dest]
                mine = mine[index % len(mine) :] + mine[: index % len(mine)]
                for op in mine:
                    try:
                        seconds, got, detail = timed_once(op, dests[dest])
                    except QemuFailed as exc:
                        notes.append(f"{spec.label}: a QEMU run to a {dest} failed: {exc}")
                        continue
                    if index == 0:
                        continue
                    entry = samples[dest][op.name]
                    entry["seconds"].append(seconds)
                    entry["bytes"].append(got)
                    entry["detail"].append(detail)
        result = {
            "size": spec.size,
            "vcpus": spec.vcpus,
            "options": spec.options,
            "data_bytes_in_memfd": data_bytes,
            "ceiling_synthetic": ceiling.synthetic,
            "vmipc_boot_s": vm.boot_s,
            "samples": samples,
        }
        return result, qemu_ok and emu is not None
    finally:
        if emu is not None:
            emu.close()
        if ceiling is not None:
            ceiling.close()
        if vm is not None:
            vm.close()


def op_rate(size: int, entries: dict[str, Any], name: str) -> float | None:
    seconds = entries.get(name, {}).get("seconds")
    return gbps(size, median(seconds)) if seconds else None


def op_cell(size: int, entries: dict[str, Any], name: str) -> str:
    value = op_rate(size, entries, name)
    if value is None:
        return "—"
    return f"{value:.2f} · {fmt_mib(median(entries[name]['bytes']))}"


def report_dumps(specs: Sequence[GuestSpec], results: dict[str, Any]) -> None:
    say("## 1. dump-memory throughput (GB/s of guest RAM = size / wall time of one dump)")
    say()
    say(
        "Cells: throughput · bytes written (for a file: the bytes it stores). Ratios compare "
        "medians of the same run; > 1.00x means vmipc is faster."
    )
    say()
    for spec in specs:
        result = results.get(spec.key)
        if result is None:
            continue
        say(
            f"### {spec.label} ({spec.vcpus} vCPUs, {spec.options}; "
            f"{fmt_mib(result['data_bytes_in_memfd'])} of data in the memfd; "
            f"median of {result['rounds']})"
        )
        say()
        rows = []
        for dest in DESTINATIONS:
            entries = result["samples"][dest]
            ceilings = {
                name: op_rate(spec.size, entries, name)
                for name in entries
                if name.startswith("ceiling")
            }
            best = max(ceilings, key=lambda name: ceilings[name] or 0.0)
            ceiling = ceilings[best]
            method = best.removeprefix("ceiling: ")
            stream = op_rate(spec.size, entries, "vmipc stream")
            raw = op_rate(spec.size, entries, "vmipc raw")
            qemu = op_rate(spec.size, entries, "qemu")
            size = spec.size
            rows.append(
                [
                    dest,
                    op_cell(size, entries, "vmipc stream"),
                    op_cell(size, entries, "vmipc raw"),
                    f"{op_cell(size, entries, best)} ({method})",
                    op_cell(size, entries, "qemu"),
                    ratio(stream, ceiling),
                    ratio(raw, ceiling),
                    ratio(stream, qemu),
                    ratio(raw, qemu),
                ]
            )
        say(
            table(
                [
                    "to a",
                    "vmipc stream",
                    "vmipc raw",
                    "kernel ceiling (best plain copy)",
                    "QEMU `migrate fd:`",
                    "stream ÷ ceiling",
                    "raw ÷ ceiling",
                    "stream ÷ QEMU",
                    "raw ÷ QEMU",
                ],
                rows,
            )
        )
        say()
    say("Every plain copy tried for the ceiling (GB/s of guest RAM, median):")
    say()
    rows = []
    for spec in specs:
        result = results.get(spec.key)
        if result is None:
            continue
        for dest in DESTINATIONS:
            parts = []
            for name, entry in result["samples"][dest].items():
                if name.startswith("ceiling") and entry["seconds"]:
                    rate = gbps(spec.size, median(entry["seconds"]))
                    parts.append(f"{name.removeprefix('ceiling: ')} {rate:.2f}")
            rows.append([spec.label, dest, "; ".join(parts)])
    say(table(["guest", "to a", "method GB/s"], rows))
    say()
    say(
        "vmipc is `python -m vmipc vmm --socket` in its own process, paused, driven by "
        "`SyncClient.dump_memory(format=..., out=fd)`; time = the call. The ceiling copies "
        "the guest's own memfd (reopened through /proc) in this process, into files 4 MiB "
        "a call (one giant write into the page cache was 2-5x slower here), into pipes and "
        "sockets up to 1 GiB a call. QEMU 7.2 runs the "
        "same `builtin.elf` (`-kernel`, same RAM layout), stopped; time = `migrate` sent → "
        f"MIGRATION `completed` event, with `max-bandwidth` {QEMU_MAX_BANDWIDTH >> 40} TiB/s "
        f"and `downtime-limit` {QEMU_DOWNTIME_LIMIT_MS // 1000} s (its defaults, 128 MiB/s "
        "and 300 ms, throttle the copy); between runs it is `cont`inued and `stop`ped again "
        "(7.2 refuses a second migration from the post-migrate state). Pipe: default 64 KiB, "
        "drained by a thread splicing to /dev/null; socket: AF_UNIX socketpair, drained with "
        "recv_into; file: new file on the temp directory's file system, not fsync'ed, "
        "unlinked after each run: its numbers swing 2-5x from run to run on this machine, "
        "whose host is slow to hand out memory it has not lent recently (the page cache "
        "pages). Rounds rotate the order of the dumps. GB = 10⁹ bytes."
    )
    say()


# --- 2. dirty-log scans ------------------------------------------------------------------------

DIRTY_CONDITIONS = (
    ("idle", (("ws", "1M"), ("rate", "1")), "idle (ws=1M rate=1: a page a second per vCPU)"),
    ("dirtying", (("ws", "460M"), ("rate", "0")), "dirtying (ws=460M rate=0, flat out)"),
)


def dirty_machine(size: int, options: tuple[tuple[str, str], ...]) -> Machine:
    seen = bytearray()
    ready = threading.Event()

    def sink(data: bytes) -> None:
        seen.extend(data[:200])
        if BANNER in seen:
            ready.set()

    machine = Machine(MachineConfig(size, 2, BootSource("builtin", guest_options=options)), sink)
    try:
        machine.start()
        if not ready.wait(30):
            raise RuntimeError(f"the built-in guest printed no banner ({machine.state})")
    except BaseException:
        machine.close()
        raise
    return machine


SCAN_KINDS = ("fetch", "ioctl", "query")
#: busy wait before each timed scan, so that waking the CPU from the sleep is not timed
SPIN_S = 0.0005
clock = time.perf_counter


def spin(seconds: float) -> None:
    end = clock() + seconds
    while clock() < end:
        pass


def bench_dirty(samples: int, interval: float) -> dict[str, Any]:
    """One scan every ``interval`` s, in turn dirty_log.fetch (then bitmap_to_runs and
    the floor over its result), the bare ioctls and dirty_log.query: each sees the same
    interval of guest activity."""
    out: dict[str, Any] = {}
    for size in (GIB, 8 * GIB):
        for condition, options, _ in DIRTY_CONDITIONS:
            progress(f"dirty log: {size // GIB} GiB guest, {condition}, {samples} x 2 scans")
            machine = dirty_machine(size, options)
            try:
                time.sleep(0.3)  # both vCPUs up and at work
                assert machine.vm is not None and machine.memory is not None
                regions = machine.memory.regions
                buffers = [
                    (ctypes.c_uint64 * ((r.size // PAGE_SIZE + 63) // 64))() for r in regions
                ]
                machine.dirty_log.start()
                machine.dirty_log.fetch()  # whatever built up since start
                timings: dict[str, list[float]] = {
                    key: []
                    for key in ("fetch", "ioctl", "runs", "query", "floor", "pages", "run_count")
                }
                warmup = 6
                bitmaps: list[bytes] = []
                for index in range(warmup + 3 * samples):
                    time.sleep(interval)
                    spin(SPIN_S)
                    kind = SCAN_KINDS[index % 3]
                    keep = index >= warmup
                    if kind == "ioctl":
                        t0 = clock()
                        for slot, words in enumerate(buffers):
                            machine.vm.get_dirty_log(slot, words)
                        t1 = clock()
                    elif kind == "query":
                        t0 = clock()
                        machine.dirty_log.query()
                        t1 = clock()
                    else:
                        t0 = clock()
                        bitmaps = machine.dirty_log.fetch()
                        t1 = clock()
                        runs = [
                            bitmap_to_runs(bitmap, region.size // PAGE_SIZE)
                            for bitmap, region in zip(bitmaps, regions, strict=True)
                        ]
                        t2 = clock()
                        pages = sum(
                            int.from_bytes(bitmap, "little").bit_count() for bitmap in bitmaps
                        )
                        t3 = clock()
                        if keep:
                            timings["runs"].append(t2 - t1)
                            timings["floor"].append(t3 - t2)
                            timings["pages"].append(pages)
                            timings["run_count"].append(sum(len(r) for r in runs))
                    if keep:
                        timings[kind].append(t1 - t0)
                out[f"{size // GIB}G-{condition}"] = {
                    "size": size,
                    "condition": condition,
                    "bitmap_bytes": sum(len(bitmap) for bitmap in bitmaps),
                    "slots": len(regions),
                    "samples": timings,
                }
            finally:
                machine.close()
    return out


def report_dirty(results: dict[str, Any], samples: int, interval: float) -> None:
    say(
        f"## 2. One dirty-log scan (median of {samples}, one scan every {interval * 1e3:.0f} ms; "
        "2 vCPUs)"
    )
    say()
    rows = []
    labels = {key: label for key, _, label in DIRTY_CONDITIONS}
    for result in results.values():
        timing = result["samples"]
        med = {key: median(values) for key, values in timing.items()}
        floor = med["floor"]
        rows.append(
            [
                f"{result['size'] // GIB} GiB ({result['slots']} slot"
                f"{'s' if result['slots'] > 1 else ''}, {result['bitmap_bytes'] // 1024} KiB "
                "bitmap)",
                labels[result["condition"]],
                f"{med['pages']:,.0f} / {med['run_count']:,.0f} "
                f"(~{med['pages'] * PAGE_SIZE / (interval + SPIN_S) / MIB:,.0f} MiB/s)",
                fmt_us(med["ioctl"]),
                fmt_us(med["fetch"]),
                fmt_us(med["query"]),
                fmt_us(med["runs"]),
                fmt_us(floor),
                ratio(med["fetch"], med["ioctl"]),
                ratio(med["fetch"], floor),
                ratio(med["query"], floor),
                ratio(med["runs"], floor),
            ]
        )
    say(
        table(
            [
                "guest",
                "activity",
                "dirty pages / runs per scan (rate)",
                "bare KVM_GET_DIRTY_LOG",
                "`dirty_log.fetch()`",
                "`dirty_log.query()`",
                "`bitmap_to_runs`",
                "floor: `int.from_bytes().bit_count()`",
                "fetch ÷ bare ioctl",
                "fetch ÷ floor",
                "query ÷ floor",
                "runs ÷ floor",
            ],
            rows,
        )
    )
    say()
    say(
        "Scans take turns — `dirty_log.fetch()`, the bare ioctls, `dirty_log.query()` — "
        f"so each sees the same interval of guest activity; each is timed after the pause "
        f"and a {SPIN_S * 1e3:.1f} ms busy wait (waking the CPU is not timed). Bare "
        "`KVM_GET_DIRTY_LOG`: one ioctl per slot into preallocated buffers; "
        "`dirty_log.fetch()` adds its buffers, copies and the VMM's own writes; "
        "`dirty_log.query()` fetches and ORs the result into what accumulated since logging "
        "started, then counts it; `bitmap_to_runs` and the floor run over the fetched "
        "bitmaps. With logging on, each page's first write after a scan traps to KVM (a "
        "slow software MMU on this machine), which caps the dirtying rate shown."
    )
    say()


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 MiB guests, fewer rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_dump: /dev/kvm is not usable here; nothing to measure", file=sys.stderr)
        return 1
    rounds = 3 if args.quick else 5
    big_rounds = 3
    dirty_samples, interval = (10, 0.02) if args.quick else (20, 0.025)
    notes: list[str] = []
    qemu = qemu_or_note(args.no_qemu, notes, "QEMU column")

    began = time.perf_counter()
    say(f"# vmipc dump-memory and dirty-log benchmarks ({'quick' if args.quick else 'full'} run)")
    say()
    say(
        f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * PAGE_SIZE / GIB:.0f} GiB, "
        f"Python {sys.version.split()[0]}, Linux {os.uname().release}; medians"
    )
    say()
    specs = guest_specs(args.quick)
    results: dict[str, Any] = {"quick": args.quick, "dumps": {}}
    failures: list[str] = []
    tmp = tempfile.mkdtemp(prefix="vmipc-bench-dump-")
    try:
        for spec in specs:
            spec_rounds = big_rounds if spec.size > GIB else rounds
            result, qemu_worked = bench_guest(spec, qemu, spec_rounds, tmp, notes, failures)
            result["rounds"] = spec_rounds
            results["dumps"][spec.key] = result
            if qemu is not None and not qemu_worked:
                qemu = None  # it cannot boot the guest: do not try again
                notes.append("QEMU was not tried for the guests after that one")
        report_dumps(specs, results["dumps"])
        results["dirty"] = bench_dirty(dirty_samples, interval)
        report_dirty(results["dirty"], dirty_samples, interval)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note_repeated(failures, notes)
    results["qemu_failures"] = failures
    results["notes"] = notes
    results["elapsed_s"] = time.perf_counter() - began
    say_notes(notes)
    say(f"Total benchmark time: {results['elapsed_s']:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
