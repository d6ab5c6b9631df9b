#!/usr/bin/env python3
"""How fast is the VMM? Start-up, pause/resume latency and console throughput.

Prints Markdown tables of medians (and p99 where it matters) with ratios against a
baseline measured in the same run, so a noisy shared machine affects both sides alike:

1. start to first console line: ``vmipc vmm`` vs QEMU+KVM booting the same built-in guest
   image, plus an in-process breakdown (Python start-up, Machine construction, start() to
   the first console byte and line);
2. pause latency (request -> every vCPU parked) with 1, 2 and 4 busy vCPUs, vs the floor of the
   mechanism: pthread_kill a thread blocked in a system call, it reports back through a
   threading.Condition;
3. resume latency: resume() itself, and until every vCPU thread has left its park;
4. console bytes per second from the counting boot sector, vs QEMU+KVM running it;
5. vCPU exits per second: a boot sector doing port I/O in a loop, through the VMM's exit
   handling vs bare KVM_RUN calls on the same vCPU.

Run it with the project's virtual environment: ``.venv/bin/python benchmarks/bench_vmm.py
[--quick] [--json FILE] [--no-qemu] [--only TABLE]``. The default run takes about 2 minutes,
``--quick`` about 40 s. It needs a usable /dev/kvm. QEMU is installed with
``tools/install-system-deps`` when missing; its columns are skipped, with a note, when it
still cannot run with KVM.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    median,
    ms,
    note_repeated,
    percentile,
    progress,
    qemu_or_note,
    ratio,
    say,
    say_notes,
    table,
    us,
    write_json,
)

from vmipc.guest import BUILTIN_GUEST_PATH
from vmipc.kvm._ioctl import ioctl
from vmipc.kvm._numbers import KVM_RUN
from vmipc.vmm.devices import DiskImage, VirtioBlk
from vmipc.vmm.kick import KICK_SIGNAL, install_kick_handler
from vmipc.vmm.machine import BootSource, Machine, MachineConfig
from vmipc.vmm.runstate import RunState
from vmipc.vmm.vcpu import VcpuThread

COUNTER_BOOTSECTOR = REPO / "tests" / "guests" / "counter-bootsector.bin"
MEMORY = 64 << 20
BANNER_PREFIX = b"vmipc-guest "
#: vCPU counts for the pause/resume benchmark (this machine has 2 cores)
VCPU_COUNTS = (1, 2, 4)
COUNT_LINE = re.compile(rb"count=([0-9a-f]{8})")


# --- child processes ----------------------------------------------------------------------


@dataclass
class ChildRun:
    """One spawned process. Times are seconds from just before the spawn."""

    first_byte: float | None = None
    first_chunk: int = 0
    first_line: float | None = None
    wanted_line: float | None = None
    stopped: float = 0.0
    exited: float = 0.0
    returncode: int | None = None
    output: bytes = b""
    stderr: str = ""


def run_child(
    argv: Sequence[str],
    *,
    want: bytes | None = None,
    timeout: float = 30.0,
    stop_when: Callable[[ChildRun, float], bool] | None = None,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Spawn ``argv``; time its first stdout byte, first complete line, first line holding
    ``want`` (SeaBIOS leaves "Booting from ROM.." in front of the guest's first line) and its
    exit, reading stdout until EOF. ``stop_when(run, elapsed)`` (which may look at the
    stderr read so far) ends the run early, killing the child; so does ``timeout``."""
    run = ChildRun()
    out = bytearray()
    err = bytearray()
    start = time.perf_counter()
    child = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    out_fd, err_fd = child.stdout.fileno(), child.stderr.fileno()
    open_fds = [out_fd, err_fd]
    try:
        while out_fd in open_fds:
            elapsed = time.perf_counter() - start
            if elapsed > timeout or (stop_when is not None and stop_when(run, elapsed)):
                break
            ready, _, _ = select.select(open_fds, [], [], 0.01)
            for fd in ready:
                data = os.read(fd, 65536)
                elapsed = time.perf_counter() - start
                if not data:
                    open_fds.remove(fd)
                elif fd == err_fd:
                    err += data
                    run.stderr = err.decode(errors="replace")
                else:
                    if run.first_byte is None:
                        run.first_byte, run.first_chunk = elapsed, len(data)
                    line_start = out.rfind(b"\n") + 1
                    out += data
                    if run.first_line is None and b"\n" in data:
                        run.first_line = elapsed
                    if want is not None and run.wanted_line is None:
                        complete = out[line_start:].split(b"\n")[:-1]
                        if any(want in line for line in complete):
                            run.wanted_line = elapsed
    finally:
        run.stopped = time.perf_counter() - start
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        run.returncode = child.wait()
        run.exited = time.perf_counter() - start
        if err_fd in open_fds:
            err += child.stderr.read()
        child.stderr.close()
    run.stderr = err.decode(errors="replace")
    run.output = bytes(out)
    return run


#: What QEMU prints when KVM's instruction emulator gives up (it then hangs, paused).
QEMU_EMULATION_FAILURE = ("KVM internal error", "emulation failure")
QEMU_ATTEMPTS = 3


def run_qemu(
    argv: Sequence[str],
    *,
    ready: Callable[[ChildRun], bool],
    ready_within: float,
    timeout: float,
    want: bytes | None = None,
    stop_when: Callable[[ChildRun, float], bool] | None = None,
    failures: list[str],
) -> ChildRun | None:
    """Run QEMU; again (up to QEMU_ATTEMPTS times) when KVM's emulator fails under it or
    ``ready(run)`` is not true after ``ready_within`` seconds (now and then SeaBIOS hangs
    silently here). None when every attempt failed; each failure is told in ``failures``."""

    def stop(run: ChildRun, elapsed: float) -> bool:
        if any(marker in run.stderr for marker in QEMU_EMULATION_FAILURE):
            return True
        if elapsed > ready_within and not ready(run):
            return True
        return stop_when is not None and stop_when(run, elapsed)

    for _ in range(QEMU_ATTEMPTS):
        run = run_child(argv, want=want, timeout=timeout, stop_when=stop)
        failed = [marker for marker in QEMU_EMULATION_FAILURE if marker in run.stderr]
        if failed:
            rip = re.search(r"[ER]IP=[0-9a-f]+", run.stderr)
            failures.append(f"{failed[0]}{f' at {rip.group(0)}' if rip else ''}")
        elif not ready(run):
            failures.append(
                f"no guest output after {run.stopped:.1f} s (exit {run.returncode}, "
                f"{len(run.output)} bytes: {run.output[-60:]!r}; {last_words(run.stderr)})"
            )
        else:
            return run
    return None


def last_words(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if "host doesn't support requested feature" not in line]
    return " / ".join(lines[-2:]) or "no message"


def vmipc_command() -> tuple[list[str], dict[str, str] | None]:
    """How to start the CLI: the venv's console script, else ``python -m vmipc``."""
    script = Path(sys.executable).with_name("vmipc")
    if script.exists():
        return [str(script)], None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "vmipc"], env


# --- 1. start to first console line -------------------------------------------------------


@dataclass
class InProcessStart:
    construct: float
    first_byte: float
    first_line: float
    powered_off: float


def start_in_process() -> InProcessStart:
    """Machine(...) construction, then start() to the first console byte and line."""
    first: dict[str, float] = {}
    line_seen = threading.Event()

    def sink(data: bytes) -> None:
        now = time.perf_counter()
        first.setdefault("byte", now)
        if b"\n" in data and "line" not in first:
            first["line"] = now
            line_seen.set()

    config = MachineConfig(MEMORY, 1, BootSource("builtin", guest_options=(("passes", "1"),)))
    begin = time.perf_counter()
    machine = Machine(config, sink)
    try:
        built = time.perf_counter()
        machine.start()
        if not line_seen.wait(30):
            raise RuntimeError(f"in-process built-in guest printed no line ({machine.state})")
        state = machine.wait_stopped(30)
        stopped = time.perf_counter()
        if state is not RunState.SHUTDOWN:
            raise RuntimeError(f"in-process built-in guest ended {state}: {machine.stop_reason}")
    finally:
        machine.close()
    return InProcessStart(
        construct=built - begin,
        first_byte=first["byte"] - built,
        first_line=first["line"] - built,
        powered_off=stopped - built,
    )


def bench_startup(
    runs: int, qemu: str | None, notes: list[str], qemu_failures: list[str]
) -> dict[str, Any]:
    progress(f"start-up: {runs} rounds (+1 warm-up) of vmipc, QEMU, Python and in-process")
    vmipc, env = vmipc_command()
    vmipc_argv = [*vmipc, "vmm", "--guest", "builtin", "--vcpus", "1", "--memory", "64M"]
    vmipc_argv += ["--console", "-", "--no-console-input", "--guest-opt", "passes=1"]
    qemu_argv = [
        str(qemu),
        *("-accel", "kvm", "-smp", "1", "-m", "64", "-kernel", str(BUILTIN_GUEST_PATH)),
        *("-append", "vcpus=1 passes=1", "-nographic", "-serial", "stdio", "-monitor", "none"),
        *("-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"),
    ]
    python_bare = [sys.executable, "-c", "pass"]
    python_imports = [sys.executable, "-c", "import vmipc.cli; vmipc.cli.build_parser()"]

    samples: dict[str, list[float]] = {
        key: []
        for key in (
            "vmipc_first_line",
            "vmipc_exit",
            "qemu_first_line",
            "qemu_first_guest_line",
            "qemu_exit",
            "python_bare",
            "python_imports",
            "inproc_construct",
            "inproc_first_byte",
            "inproc_first_line",
            "inproc_powered_off",
        )
    }
    qemu_ok = qemu is not None
    for round_no in range(runs + 1):
        keep = round_no > 0  # round 0 warms caches (page cache, imports, KVM module)
        cli = run_child(vmipc_argv, want=BANNER_PREFIX, timeout=30, env=env)
        first_line = cli.output.split(b"\n", 1)[0]
        if cli.first_line is None or not first_line.startswith(BANNER_PREFIX):
            raise RuntimeError(
                f"vmipc vmm printed no banner line (rc {cli.returncode}): "
                f"{cli.output[:200]!r} {last_words(cli.stderr)}"
            )
        if cli.returncode != 0 or b"vcpu=0 done" not in cli.output:
            notes.append(
                f"vmipc vmm run {round_no}: exit {cli.returncode}, "
                f"{'with' if b'vcpu=0 done' in cli.output else 'without'} 'vcpu=0 done' "
                f"({last_words(cli.stderr)})"
            )
        if keep:
            samples["vmipc_first_line"].append(cli.first_line)
            samples["vmipc_exit"].append(cli.exited)

        if qemu_ok:
            emu = run_qemu(
                qemu_argv,
                want=BANNER_PREFIX,
                ready=lambda run: run.wanted_line is not None,
                ready_within=15,
                timeout=30,
                failures=qemu_failures,
            )
            if emu is None or emu.wanted_line is None or emu.first_line is None:
                qemu_ok = False
                why = (
                    f"{QEMU_ATTEMPTS} attempts failed in a row, the last: {qemu_failures[-1]}"
                    if emu is None
                    else f"exit {emu.returncode}: {last_words(emu.stderr)}"
                )
                notes.append(
                    f"QEMU columns skipped: QEMU+KVM did not print the guest's banner ({why})"
                )
            elif keep:
                samples["qemu_first_line"].append(emu.first_line)
                samples["qemu_first_guest_line"].append(emu.wanted_line)
                samples["qemu_exit"].append(emu.exited)

        for key, argv in (("python_bare", python_bare), ("python_imports", python_imports)):
            child = run_child(argv, timeout=30, env=env)
            if child.returncode != 0:
                raise RuntimeError(f"{argv} failed: {last_words(child.stderr)}")
            if keep:
                samples[key].append(child.exited)

        inproc = start_in_process()
        if keep:
            samples["inproc_construct"].append(inproc.construct)
            samples["inproc_first_byte"].append(inproc.first_byte)
            samples["inproc_first_line"].append(inproc.first_line)
            samples["inproc_powered_off"].append(inproc.powered_off)
    if not qemu_ok:
        for key in ("qemu_first_line", "qemu_first_guest_line", "qemu_exit"):
            samples[key] = []

    med = {key: median(values) for key, values in samples.items() if values}
    qemu_guest = med.get("qemu_first_guest_line")
    qemu_any = med.get("qemu_first_line")
    say(f"## 1. Start to first console line (built-in guest, 1 vCPU, passes=1; median of {runs})")
    say()
    rows = [
        [
            "`vmipc vmm` (new process)",
            ms(med["vmipc_first_line"]),
            ms(med["vmipc_exit"]),
            ratio(med["vmipc_first_line"], qemu_guest),
            ratio(med["vmipc_first_line"], qemu_any),
        ]
    ]
    if qemu_guest is not None and qemu_any is not None:
        rows.append(
            [
                "QEMU + KVM: first line of the guest (its banner)",
                ms(qemu_guest),
                ms(med["qemu_exit"]),
                "1.00x",
                "—",
            ]
        )
        rows.append(
            ["QEMU + KVM: first line of any kind (SeaBIOS)", ms(qemu_any), "", "—", "1.00x"]
        )
    else:
        rows.append(["QEMU + KVM", "skipped (see notes)", "", "—", "—"])
    say(
        table(
            [
                "what",
                "first line",
                "process exit",
                "ratio to QEMU guest line",
                "ratio to QEMU any line",
            ],
            rows,
        )
    )
    say()
    say("Where the time goes (median; in-process rows run inside this benchmark's process):")
    say()
    inproc_total = med["inproc_construct"] + med["inproc_first_line"]
    say(
        table(
            ["step", "time", "ratio to `vmipc vmm` first line"],
            [
                [
                    "Python start-up alone (`python -c pass`, to exit)",
                    ms(med["python_bare"]),
                    ratio(med["python_bare"], med["vmipc_first_line"]),
                ],
                [
                    "Python start-up + vmipc imports + argument parser (to exit)",
                    ms(med["python_imports"]),
                    ratio(med["python_imports"], med["vmipc_first_line"]),
                ],
                [
                    "`Machine(...)` construction",
                    ms(med["inproc_construct"]),
                    ratio(med["inproc_construct"], med["vmipc_first_line"]),
                ],
                [
                    "`start()` → first console byte",
                    ms(med["inproc_first_byte"]),
                    ratio(med["inproc_first_byte"], med["vmipc_first_line"]),
                ],
                [
                    "`start()` → first console line",
                    ms(med["inproc_first_line"]),
                    ratio(med["inproc_first_line"], med["vmipc_first_line"]),
                ],
                [
                    "in-process total: construction → first line",
                    ms(inproc_total),
                    ratio(inproc_total, med["vmipc_first_line"]),
                ],
                [
                    "`start()` → guest powered off (passes=1 done)",
                    ms(med["inproc_powered_off"]),
                    "",
                ],
            ],
        )
    )
    say()
    return {"runs": runs, "samples_s": samples, "qemu": qemu_ok}


# --- 2 and 3. pause and resume latency ----------------------------------------------------


class TimedMachine(Machine):
    """A Machine that notes when the first and the last vCPU thread leave their park.

    Overriding ``_note_parked`` and reading ``_parked`` (both private to Machine) is
    acceptable in a benchmark: it is the only way to see the moment without polling, and
    polling from this thread would compete with the vCPU threads for the GIL.
    """

    def __init__(
        self,
        config: MachineConfig,
        console: Callable[[bytes], None],
        disk: DiskImage | None = None,
    ) -> None:
        self.first_unparked_at = self.all_unparked_at = 0.0
        self.all_out = threading.Event()  # the waiter blocks on it: no polling thread
        super().__init__(config, console, disk=disk)

    def _note_parked(self, thread: VcpuThread, parked: bool) -> None:
        super()._note_parked(thread, parked)
        if not parked:
            now = time.perf_counter()
            if not self.first_unparked_at:
                self.first_unparked_at = now
            if not self._parked:
                self.all_unparked_at = now
                self.all_out.set()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


@dataclass
class PauseSamples:
    pause: list[float]
    resume_call: list[float]
    resume_first_running: list[float]
    resume_all_running: list[float]
    note: str = ""


def pause_machine(
    vcpus: int, pauses: int, warmup: int, rng: random.Random, *, disk: bool = False
) -> PauseSamples:
    """Pause/resume a built-in guest whose vCPUs run flat out (rate=0) in ring 3; with
    ``disk``, vCPU 0 runs the disk workload instead (16 requests in flight on a 1 MiB
    image), so that each pause drains the block device."""
    console_bytes = [0]

    def sink(data: bytes) -> None:
        console_bytes[0] += len(data)

    options: tuple[tuple[str, str], ...] = (("rate", "0"),)
    image = None
    if disk:
        options += (("disk", "1"), ("depth", "16"), ("blocks", "64"))
        fd, path = tempfile.mkstemp(prefix="vmipc-bench-disk-")
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        image = DiskImage.open(path)
        os.unlink(path)
    config = MachineConfig(MEMORY, vcpus, BootSource("builtin", guest_options=options))
    samples = PauseSamples([], [], [], [])
    try:
        machine = TimedMachine(config, sink, image)
    except BaseException:
        if image is not None:
            image.close()
        raise
    try:
        machine.start()
        wait_for(lambda: console_bytes[0] > 0, "the guest's first output", 30)
        time.sleep(0.3)  # let every vCPU come up and get busy
        exits_before = sum(thread.exits for thread in machine._threads)
        began, bytes_before = time.perf_counter(), console_bytes[0]
        for index in range(warmup + pauses):
            time.sleep(rng.uniform(0.001, 0.005))
            t0 = time.perf_counter()
            machine.pause()
            t1 = time.perf_counter()
            if machine.state is not RunState.PAUSED:
                raise RuntimeError(f"pause left the machine {machine.state}")
            machine.first_unparked_at = machine.all_unparked_at = 0.0
            machine.all_out.clear()
            t2 = time.perf_counter()
            machine.resume()
            t3 = time.perf_counter()
            if not machine.all_out.wait(5):
                raise RuntimeError("timed out waiting for every vCPU to leave its park")
            if index >= warmup:
                samples.pause.append(t1 - t0)
                samples.resume_call.append(t3 - t2)
                samples.resume_first_running.append(machine.first_unparked_at - t2)
                samples.resume_all_running.append(machine.all_unparked_at - t2)
        elapsed = time.perf_counter() - began
        exits = sum(thread.exits for thread in machine._threads) - exits_before
        if machine.state is not RunState.RUNNING:
            raise RuntimeError(f"guest stopped during the benchmark: {machine.stop_reason}")
        if disk:
            blk = machine.devices.get("virtio-blk", VirtioBlk)
            samples.note = (
                f"disk workload at depth 16: {blk.completed / elapsed:,.0f} requests/s "
                "completed while being paused and resumed"
            )
            return samples
        samples.note = (
            f"{vcpus} busy vCPU{'s' if vcpus > 1 else ''}: "
            f"{exits / elapsed / vcpus:,.0f} exits/s per vCPU and "
            f"{(console_bytes[0] - bytes_before) / elapsed:,.0f} console bytes/s "
            "while being paused and resumed"
        )
    finally:
        machine.close()
        if image is not None:
            image.close()
    return samples


class KickFloor:
    """The floor under Machine.pause(): N threads blocked in read(2) on a pipe, kicked out
    with pthread_kill(KICK_SIGNAL) (EINTR), each reporting back through a Condition and
    waiting at a closed gate — the same steps as a vCPU, minus KVM."""

    def __init__(self, nthreads: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL
        self._read = libc.read
        self._read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self._read.restype = ctypes.c_ssize_t
        self._rfd, self._wfd = os.pipe()
        self._cond = threading.Condition()
        self._gate_closed = False
        self._stopping = False
        self._parked: set[int] = set()
        self.first_unparked_at = self.all_unparked_at = 0.0
        self.all_out = threading.Event()
        self._threads = [
            threading.Thread(target=self._main, args=(i,), daemon=True) for i in range(nthreads)
        ]
        for thread in self._threads:
            thread.start()

    def _main(self, index: int) -> None:
        buf = ctypes.create_string_buffer(1)
        while True:
            if self._read(self._rfd, buf, 1) >= 0:
                return  # EOF: closing
            if ctypes.get_errno() != errno.EINTR:
                raise OSError(ctypes.get_errno(), "read")
            with self._cond:
                if self._stopping:
                    return
                self._parked.add(index)
                self._cond.notify_all()
                while self._gate_closed and not self._stopping:
                    self._cond.wait()
                self._parked.discard(index)
                now = time.perf_counter()
                if not self.first_unparked_at:
                    self.first_unparked_at = now
                if not self._parked:
                    self.all_unparked_at = now
                    self.all_out.set()

    def _kick(self, only_running: bool) -> None:
        for index, thread in enumerate(self._threads):
            if thread.ident is not None and not (only_running and index in self._parked):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def pause(self) -> int:
        """Kick every thread and wait until all report back; returns how many re-kicks a
        kick that landed outside read(2) needed (such a sample is not kept)."""
        rekicks = 0
        with self._cond:
            self._gate_closed = True
            self._kick(False)
            while len(self._parked) < len(self._threads):
                if not self._cond.wait(0.05):
                    rekicks += 1
                    self._kick(True)
        return rekicks

    def resume(self) -> None:
        with self._cond:
            self._gate_closed = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        os.close(self._wfd)
        for thread in self._threads:
            thread.join(5)
        os.close(self._rfd)


def pause_floor(nthreads: int, pauses: int, warmup: int, rng: random.Random) -> PauseSamples:
    samples = PauseSamples([], [], [], [])
    floor = KickFloor(nthreads)
    lost = 0
    try:
        time.sleep(0.05)  # every thread reaches read(2)
        for index in range(warmup + pauses):
            time.sleep(rng.uniform(0.001, 0.005))
            t0 = time.perf_counter()
            rekicks = floor.pause()
            t1 = time.perf_counter()
            floor.first_unparked_at = floor.all_unparked_at = 0.0
            floor.all_out.clear()
            t2 = time.perf_counter()
            floor.resume()
            t3 = time.perf_counter()
            if not floor.all_out.wait(5):
                raise RuntimeError("timed out waiting for every floor thread to leave its park")
            if rekicks:
                lost += 1
            elif index >= warmup:
                samples.pause.append(t1 - t0)
                samples.resume_call.append(t3 - t2)
                samples.resume_first_running.append(floor.first_unparked_at - t2)
                samples.resume_all_running.append(floor.all_unparked_at - t2)
    finally:
        floor.close()
    if lost:
        samples.note = f"floor with {nthreads} thread(s): {lost} kicks landed outside read(2)"
    return samples


def bench_pause(pauses: int, notes: list[str]) -> dict[str, Any]:
    warmup = max(10, pauses // 20)
    rng = random.Random(20240601)
    results: dict[str, PauseSamples] = {}
    for vcpus in VCPU_COUNTS:
        progress(f"pause/resume: {pauses} pauses with {vcpus} busy vCPU(s), then the floor")
        results[f"machine_{vcpus}"] = pause_machine(vcpus, pauses, warmup, rng)
        results[f"floor_{vcpus}"] = pause_floor(vcpus, pauses, warmup, rng)
    progress(f"pause/resume: {pauses} pauses with the disk workload (16 requests in flight)")
    results["machine_disk"] = pause_machine(1, pauses, warmup, rng, disk=True)
    for item in results.values():
        if item.note:
            notes.append(item.note)

    say(f"## 2. Pause latency (request → all vCPUs parked; {pauses} pauses at random moments)")
    say()
    rows = []
    for vcpus in VCPU_COUNTS:
        mach, floor = results[f"machine_{vcpus}"], results[f"floor_{vcpus}"]
        rows.append(
            [
                f"`Machine.pause()`, {vcpus} busy vCPU{'s' if vcpus > 1 else ''} (rate=0)",
                us(median(mach.pause)),
                us(percentile(mach.pause, 99)),
                ratio(median(mach.pause), median(floor.pause)),
                ratio(percentile(mach.pause, 99), percentile(floor.pause, 99)),
            ]
        )
        rows.append(
            [
                f"floor: pthread_kill {vcpus} thread{'s' if vcpus > 1 else ''} "
                "blocked in read(2) → Condition",
                us(median(floor.pause)),
                us(percentile(floor.pause, 99)),
                "1.00x",
                "1.00x",
            ]
        )
    disk, busy = results["machine_disk"], results["machine_1"]
    rows.append(
        [
            "`Machine.pause()`, 1 vCPU driving the block device, 16 requests in flight "
            "(ratios: to 1 busy vCPU without a disk)",
            us(median(disk.pause)),
            us(percentile(disk.pause, 99)),
            ratio(median(disk.pause), median(busy.pause)),
            ratio(percentile(disk.pause, 99), percentile(busy.pause, 99)),
        ]
    )
    say(table(["what", "p50", "p99", "p50 ratio to floor", "p99 ratio to floor"], rows))
    say()
    say("## 3. Resume latency (`resume()` call; until the first and the last vCPU left its park)")
    say()
    rows = []
    for vcpus in VCPU_COUNTS:
        mach, floor = results[f"machine_{vcpus}"], results[f"floor_{vcpus}"]
        plural = "s" if vcpus > 1 else ""
        for label, item, base in (
            (f"`Machine.resume()`, {vcpus} busy vCPU{plural}", mach, floor),
            (f"floor: notify_all → {vcpus} thread{plural} out of the Condition", floor, None),
        ):
            rows.append(
                [
                    label,
                    us(median(item.resume_call)),
                    us(percentile(item.resume_call, 99)),
                    us(median(item.resume_first_running)),
                    us(median(item.resume_all_running)),
                    us(percentile(item.resume_all_running, 99)),
                    "1.00x"
                    if base is None
                    else ratio(median(item.resume_all_running), median(base.resume_all_running)),
                ]
            )
    say(
        table(
            [
                "what",
                "call p50",
                "call p99",
                "first out p50",
                "all out p50",
                "all out p99",
                "all out p50 ratio to floor",
            ],
            rows,
        )
    )
    say()
    say(
        f'"Out" is when a vCPU thread has left its park (about to re-enter KVM_RUN). This '
        f"machine has {os.cpu_count()} CPUs: with more busy vCPU threads than CPUs, the vCPUs "
        "that wake last wait for the scheduler to give them one."
    )
    say()
    return {
        "pauses": pauses,
        "warmup": warmup,
        "samples_s": {k: asdict(v) for k, v in results.items()},
    }


# --- 4. console throughput ----------------------------------------------------------------


def check_counter(output: bytes) -> str:
    """'' when the output is count=00000000, count=00000001, ... (the last line may be cut)."""
    lines = output.split(b"\n")[:-1]
    for expected, line in enumerate(lines):
        match = COUNT_LINE.fullmatch(line.strip(b"\r"))
        if match is None or int(match.group(1), 16) != expected:
            return f"line {expected} is {line[:40]!r}, expected count={expected:08x}"
    return "" if lines else "no complete line"


def console_in_process(window: float) -> tuple[float, str]:
    """Bytes/s reaching the console sink over ``window`` seconds after the first byte."""
    received = bytearray()
    first: list[float] = []

    def sink(data: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        received.extend(data)

    config = MachineConfig(MEMORY, 1, BootSource("bootsector", path=str(COUNTER_BOOTSECTOR)))
    machine = Machine(config, sink)
    try:
        machine.start()
        wait_for(lambda: bool(first), "the counter's first byte", 30)
        start, start_bytes = first[0], 1
        time.sleep(window)
        end, end_bytes = time.perf_counter(), len(received)
        state = machine.state
    finally:
        machine.close()
    if state is not RunState.RUNNING:
        return 0.0, f"vmipc: the counter stopped ({state}): {machine.stop_reason}"
    return (end_bytes - start_bytes) / (end - start), check_counter(bytes(received))


def console_qemu(qemu: str, window: float, qemu_failures: list[str]) -> tuple[float, str]:
    argv = [
        qemu,
        *("-accel", "kvm", "-smp", "1", "-m", "64", "-boot", "c"),
        # as a raw IDE disk (boots sooner than from a floppy); writes go to a throwaway overlay
        *("-drive", f"format=raw,file={COUNTER_BOOTSECTOR},if=ide,snapshot=on"),
        *("-display", "none", "-vga", "none", "-serial", "stdio", "-monitor", "none"),
        "-no-reboot",
    ]
    emu = run_qemu(
        argv,
        ready=lambda run: run.first_byte is not None,
        ready_within=12,
        timeout=20 + window,
        stop_when=lambda run, elapsed: (
            run.first_byte is not None and elapsed - run.first_byte >= window
        ),
        failures=qemu_failures,
    )
    if emu is None:
        return 0.0, f"{QEMU_ATTEMPTS} attempts failed in a row, the last: {qemu_failures[-1]}"
    if emu.first_byte is None:
        return 0.0, f"QEMU printed nothing (exit {emu.returncode}: {last_words(emu.stderr)})"
    rate = (len(emu.output) - emu.first_chunk) / (emu.stopped - emu.first_byte)
    return rate, check_counter(emu.output)


def bench_console(
    window: float, runs: int, qemu: str | None, notes: list[str], qemu_failures: list[str]
) -> dict[str, Any]:
    progress(f"console: {runs} x {window:.0f} s of the counting boot sector, vmipc and QEMU")
    ours: list[float] = []
    theirs: list[float] = []
    qemu_ok = qemu is not None
    for _ in range(runs):
        rate, problem = console_in_process(window)
        if problem:
            notes.append(f"counter under vmipc: {problem}")
        ours.append(rate)
        if qemu_ok and qemu is not None:
            rate, problem = console_qemu(qemu, window, qemu_failures)
            if rate == 0.0:
                qemu_ok = False
                notes.append(f"QEMU console column skipped: {problem}")
                continue
            if problem:
                notes.append(f"counter under QEMU: {problem}")
            theirs.append(rate)
    if not qemu_ok:
        theirs = []

    baseline = median(theirs) if theirs else None
    say(
        f"## 4. Console throughput (counting boot sector, {window:.0f} s after the first byte; "
        f"median of {runs})"
    )
    say()
    rows = [
        [
            "vmipc, in-process → console sink",
            f"{median(ours):,.0f}",
            f"{median(ours) / 16:,.0f}",
            ratio(median(ours), baseline),
        ]
    ]
    if baseline is not None:
        rows.append(
            ["QEMU + KVM → stdout pipe", f"{baseline:,.0f}", f"{baseline / 16:,.0f}", "1.00x"]
        )
    else:
        rows.append(["QEMU + KVM", "skipped (see notes)", "", "—"])
    say(table(["what", "bytes/s", "lines/s", "ratio to QEMU"], rows))
    say()
    say(
        "Both run the boot sector in real mode, which this machine's KVM (kvm_pvm) emulates "
        "instruction by instruction (~1 M instructions/s), and every byte is an OUT exit to "
        "the VMM's UART model."
    )
    say()
    return {"window_s": window, "runs": runs, "vmipc_bytes_per_s": ours, "qemu_bytes_per_s": theirs}


# --- vCPU exits ---------------------------------------------------------------------------

#: mov dx, 0x80; loop: out dx, al; in al, dx; jmp loop — every instruction but the jump
#: is an exit to the VMM (port 0x80, the POST port: writes dropped, reads all ones)
PORT_IO_LOOP = bytes.fromhex("ba8000eeecebfc").ljust(510, b"\0") + b"\x55\xaa"


def exits_in_process(path: str, window: float) -> float:
    """Exits per second the VMM's vCPU thread handles while the loop runs."""
    config = MachineConfig(MEMORY, 1, BootSource("bootsector", path=path))
    machine = Machine(config, lambda data: None)
    try:
        machine.start()
        thread = machine._threads[0]
        wait_for(lambda: thread.exits > 1000, "the loop's first exits", 30)
        start, start_exits = time.perf_counter(), thread.exits
        time.sleep(window)
        end, end_exits = time.perf_counter(), thread.exits
        state = machine.state
    finally:
        machine.close()
    if state is not RunState.RUNNING:
        raise RuntimeError(f"the port-I/O loop stopped ({state}): {machine.stop_reason}")
    return (end_exits - start_exits) / (end - start)


def exits_floor(path: str, window: float) -> float:
    """Exits per second of bare KVM_RUN calls on the same machine's vCPU, in this thread:
    nothing decoded, nothing dispatched (re-entering completes an I/O exit; an IN reads
    whatever the buffer holds)."""
    config = MachineConfig(MEMORY, 1, BootSource("bootsector", path=path))
    machine = Machine(config, lambda data: None)
    try:
        fd = machine.vcpus[0].fd
        for _ in range(1000):
            ioctl(fd, "KVM_RUN", KVM_RUN)
        count, start = 0, time.perf_counter()
        deadline = start + window
        while True:
            for _ in range(1000):
                ioctl(fd, "KVM_RUN", KVM_RUN)
            count += 1000
            now = time.perf_counter()
            if now >= deadline:
                return count / (now - start)
    finally:
        machine.close()


def bench_exits(window: float, runs: int) -> dict[str, Any]:
    progress(f"exits: {runs} x {window:.0f} s of a port-I/O loop, the VMM and bare KVM_RUN")
    ours: list[float] = []
    floor: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "port-io-loop.bin")
        Path(path).write_bytes(PORT_IO_LOOP)
        for _ in range(runs):
            ours.append(exits_in_process(path, window))
            floor.append(exits_floor(path, window))
    say(f"## 5. vCPU exits per second (port-I/O loop boot sector; median of {runs})")
    say()
    rows = [
        [
            "vmipc: KVM_RUN, decode the exit, port bus, complete",
            f"{median(ours):,.0f}",
            f"{1e6 / median(ours):.1f} µs",
            ratio(median(ours), median(floor)),
        ],
        [
            "floor: bare KVM_RUN in a loop",
            f"{median(floor):,.0f}",
            f"{1e6 / median(floor):.1f} µs",
            "1.00x",
        ],
    ]
    say(table(["what", "exits/s", "per exit", "ratio to floor"], rows))
    say()
    say(
        "Half the exits are OUT, half IN, to port 0x80; the loop runs in real mode, which "
        "this machine's KVM emulates, so the floor includes the emulator's work."
    )
    say()
    return {"window_s": window, "runs": runs, "vmipc_exits_per_s": ours, "floor_exits_per_s": floor}


# --- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baselines")
    parser.add_argument(
        "--only",
        choices=("startup", "pause", "console", "exits"),
        action="append",
        help="run only this table (repeatable)",
    )
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_vmm: /dev/kvm is not usable here; nothing to measure", file=sys.stderr)
        return 1
    install_kick_handler()  # main thread: the floor's threads need the no-op handler too

    startup_runs, pauses, console_runs, window = (
        (3, 200, 1, 1.0) if args.quick else (10, 500, 3, 2.0)
    )
    notes: list[str] = []
    qemu = qemu_or_note(args.no_qemu, notes, still_missing="tools/install-system-deps")

    began = time.perf_counter()
    say(f"# vmipc VMM benchmarks ({'quick' if args.quick else 'full'} run)")
    say()
    say(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"{os.uname().release}; medians unless marked p99"
    )
    say()
    results: dict[str, Any] = {"quick": args.quick}
    qemu_failures: list[str] = []
    only = set(args.only or ("startup", "pause", "console", "exits"))
    if "startup" in only:
        results["startup"] = bench_startup(startup_runs, qemu, notes, qemu_failures)
        if not results["startup"]["qemu"] and qemu is not None:
            qemu = None  # it cannot boot the guest: do not try again below
    if "pause" in only:
        results["pause_resume"] = bench_pause(pauses, notes)
    if "console" in only:
        results["console"] = bench_console(window, console_runs, qemu, notes, qemu_failures)
    if "exits" in only:
        results["exits"] = bench_exits(window, console_runs + 2)
    note_repeated(qemu_failures, notes, "run(s)")
    results["qemu_failures"] = qemu_failures
    results["notes"] = notes
    results["elapsed_s"] = time.perf_counter() - began
    say_notes(notes)
    say(f"Total benchmark time: {results['elapsed_s']:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
