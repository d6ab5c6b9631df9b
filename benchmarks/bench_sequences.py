#!/usr/bin/env python3
"""Sequences: live migration against dirty rate, checkpoint and restore, beside QEMU.

Prints Markdown tables of medians with ratios against QEMU + KVM doing the same with the
same built-in guest image (``src/vmipc/guest/builtin.elf``) in the same run, so a noisy
shared machine affects both sides alike:

1. live migration of a 1 GiB guest with 2 vCPUs on one host, for several dirty rates (an
   idle guest and working sets of 8, 64 and 256 MiB per vCPU rewritten at a paced rate):
   total time, downtime, rounds, bytes and the measured dirty rate. vmipc: two ``vmipc vmm``
   processes and ``vmipc.sequences.migrate`` (``migrate_blocking``) between their sockets;
   QEMU: two local QEMUs, ``migrate-incoming`` / ``migrate`` over a UNIX socket,
   ``query-migrate`` for total time and downtime;
2. checkpoint of 256 MiB, 1 GiB and 4 GiB guests whose RAM is mostly touched and which
   rewrite it flat out (``rate=0``): ``vmipc.sequences.checkpoint`` to a file, plain (pause,
   dump, resume) and live (``mode=Live()``: RAM copied while the guest runs, paused for the
   last round of dirty pages and the state), alternately on the same VM, beside QEMU's
   ``stop`` + ``migrate`` into the file + ``cont``;
3. restore of those snapshots until the guest runs (and prints its next line):
   ``vmipc vmm --restore FILE`` lazy and ``--eager``, ``vmipc restore FILE`` (the
   sequence, ``restore_into``) into an already-running ``vmipc vmm --incoming``, beside
   QEMU ``-incoming defer`` + ``migrate-incoming`` from the file + ``cont``; both from the
   process's start and, for the restore into a waiting VMM and QEMU, from the first
   request (process start excluded).

It also draws downtime and total time against dirty rate for both, log-log, with
matplotlib: the optional ``bench`` extra (``pip install -e '.[bench]'``), which
``make bench`` installs; without it the tables are printed and the plot is skipped.

Run: ``.venv/bin/python benchmarks/bench_sequences.py [--quick] [--json FILE] [--plot PATH]
[--no-qemu] [--restore-only]``. The default run takes about 5 minutes, ``--quick`` (no 8 MiB
working set and no 4 GiB guest; one migration and one checkpoint of each kind, two restores)
about 2; ``--restore-only`` runs tables 2 and 3 only (one checkpoint of each kind, every
size, three restores of each kind). It
needs a usable /dev/kvm (as root). QEMU is installed with ``tools/install-system-deps``
when missing; its columns are skipped, with a note, when it still cannot boot the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import trio
from _common import (
    REPO,
    QemuFailed,
    QmpConnection,
    median,
    note_repeated,
    qemu_or_note,
    ratio,
    say,
    say_banner,
    say_notes,
    table,
    write_json,
)

from vmipc.client import Client, SyncClient, open_client
from vmipc.guest import BUILTIN_GUEST_PATH
from vmipc.sequences import (
    Live,
    MigrationPolicy,
    SequenceError,
    SnapshotReport,
    checkpoint,
    checkpoint_blocking,
    migrate_blocking,
    restore_into,
)

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
BANNER = b"vmipc-guest "
VCPUS = 2
MIGRATION_MEMORY = "1G"
#: the downtime both sides aim at (vmipc's default --max-downtime, QEMU's downtime-limit)
MAX_DOWNTIME_MS = 50
#: QEMU's migration speed limit, set before every migration (its default is 128 MiB/s)
QEMU_MAX_BANDWIDTH = 1 << 40
#: QEMU never gives up on a migration that does not converge; vmipc (force=True) stops and
#: copies what is left once its policy gives up. QEMU is made to do the same after this
#: long, by raising its downtime limit to the maximum.
QEMU_FORCE_AFTER_S = 20.0
QEMU_FORCED_DOWNTIME_MS = 2_000_000
QEMU_ATTEMPTS = 3
QEMU_FAILURE_MARKERS = ("KVM internal error", "emulation failure")
PASS_LINE = re.compile(rb"vcpu=(\d+) pass=(\d+) ")


@dataclass(frozen=True)
class Level:
    """One dirty rate for the migration benchmark: guest options of the built-in guest."""

    name: str
    ws: str
    rate: int
    #: wait until every vCPU finished a pass (its working set is written) before migrating
    touch: bool

    @property
    def options(self) -> str:
        return f"ws={self.ws} rate={self.rate}"


LEVELS = (
    Level("idle", "1M", 1, False),
    Level("ws 8 MiB", "8M", 2048, True),
    Level("ws 64 MiB", "64M", 8192, True),
    Level("ws 256 MiB", "256M", 32768, True),
)


@dataclass(frozen=True)
class SnapSize:
    """A guest for the checkpoint/restore benchmark, its RAM mostly touched."""

    label: str
    memory: str
    bytes: int
    ws: str

    @property
    def touched(self) -> float:
        return VCPUS * int(self.ws[:-1]) * MIB / self.bytes

    @property
    def options(self) -> str:
        return f"ws={self.ws} rate=0"


SNAP_SIZES = (
    SnapSize("256 MiB", "256M", 256 * MIB, "102M"),
    SnapSize("1 GiB", "1G", GIB, "409M"),
    # each working set is contiguous in one RAM region: both fit below 3 GiB, not 80 %
    SnapSize("4 GiB", "4G", 4 * GIB, "1460M"),
)


# --- statistics and output ----------------------------------------------------------------


def med(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f} ms"


def fmt_rate(pages_per_s: float | None) -> str:
    return "—" if pages_per_s is None else f"{pages_per_s:,.0f}"


def fmt_mib(count: float | None) -> str:
    return "—" if count is None else f"{count / MIB:,.0f} MiB"


BEGAN = time.monotonic()


def progress(text: str) -> None:
    print(f"... [{time.monotonic() - BEGAN:4.0f} s] {text}", file=sys.stderr, flush=True)


# --- child processes ----------------------------------------------------------------------


class Children:
    """Every process this script starts, so that each is killed (by pid) whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], stderr: Path) -> subprocess.Popen[bytes]:
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        self.procs.clear()

    def reap(self) -> None:
        self.procs = [proc for proc in self.procs if proc.poll() is None]


def wait_for(check: Callable[[], bool], what: str, timeout: float, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def last_words(path: Path) -> str:
    text = read(path).decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "host doesn't support requested feature" not in line]
    return " / ".join(lines[-2:]) or "no message"


def passes_done(output: bytes) -> int:
    """The number of vCPUs that have printed at least one pass line."""
    return len({m.group(1) for m in PASS_LINE.finditer(output)})


# --- vmipc: a VMM process driven through its socket ---------------------------------------


class VmipcVmm:
    """``python -m vmipc vmm ... --socket S --console FILE`` in a process of its own."""

    def __init__(self, kids: Children, tmp: Path, name: str, args: Sequence[str]) -> None:
        self.kids = kids
        self.socket = str(tmp / f"{name}.sock")
        self.console = tmp / f"{name}.console"
        self.stderr = tmp / f"{name}.stderr"
        argv = [sys.executable, "-m", "vmipc", "vmm", *args, "--socket", self.socket]
        argv += ["--console", str(self.console), "--no-console-input"]
        self.started = time.perf_counter()
        self.proc = kids.spawn(argv, self.stderr)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"vmipc vmm exited {self.proc.returncode}: {last_words(self.stderr)}"
            )

    def client(self, timeout: float = 120.0) -> SyncClient:
        """A connected client, as soon as the VMM answers (retrying until it listens)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return SyncClient(self.socket, timeout=timeout, client_name="bench_sequences")
            except (FileNotFoundError, ConnectionRefusedError):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def wait_output(self, check: Callable[[bytes], bool], what: str, timeout: float) -> None:
        def ready() -> bool:
            self.check_alive()
            return check(read(self.console))

        wait_for(ready, f"vmipc: {what}", timeout)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                with SyncClient(self.socket, timeout=10) as client:
                    client.quit()
                self.proc.wait(10)
            except Exception:
                pass
        self.kids.kill(self.proc)


# --- QEMU: QMP and a QEMU process ---------------------------------------------------------


class Qmp(QmpConnection):
    """A QMP connection: commands (an fd passed by SCM_RIGHTS where asked); events dropped."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if proc.poll() is not None:
                    raise QemuFailed(
                        f"QEMU exited {proc.returncode}: {last_words(stderr)}"
                    ) from None
                if time.monotonic() > deadline:
                    raise QemuFailed("QEMU's QMP socket did not answer within 30 s") from None
                time.sleep(0.002)
        sock.settimeout(300)
        super().__init__(sock)


class QemuVm:
    """QEMU + KVM with the built-in guest (``-kernel``), or waiting for ``-incoming defer``."""

    def __init__(
        self,
        kids: Children,
        qemu: str,
        tmp: Path,
        name: str,
        memory_mib: int,
        options: str,
        *,
        incoming: bool,
    ) -> None:
        self.kids = kids
        self.serial = tmp / f"{name}.serial"
        self.stderr = tmp / f"{name}.stderr"
        qmp_path = str(tmp / f"{name}.qmp")
        argv = [qemu, "-accel", "kvm", "-m", str(memory_mib), "-smp", str(VCPUS)]
        argv += ["-kernel", str(BUILTIN_GUEST_PATH), "-append", f"vcpus={VCPUS} {options}"]
        argv += ["-display", "none", "-serial", f"file:{self.serial}", "-monitor", "none"]
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        self.started = time.perf_counter()
        self.proc = kids.spawn(argv, self.stderr)
        try:
            self.qmp = Qmp(qmp_path, self.proc, self.stderr)
        except BaseException:
            kids.kill(self.proc)
            raise

    def check(self) -> None:
        errors = read(self.stderr).decode(errors="replace")
        failed = [marker for marker in QEMU_FAILURE_MARKERS if marker in errors]
        if failed:
            rip = re.search(r"[ER]IP=[0-9a-f]+", errors)
            raise QemuFailed(f"{failed[0]}{f' at {rip.group(0)}' if rip else ''}")
        if self.proc.poll() is not None:
            raise QemuFailed(f"QEMU exited {self.proc.returncode}: {last_words(self.stderr)}")

    def wait_output(self, check: Callable[[bytes], bool], what: str, timeout: float) -> None:
        def ready() -> bool:
            self.check()
            return check(read(self.serial))

        try:
            wait_for(ready, f"QEMU: {what}", timeout)
        except TimeoutError as exc:
            raise QemuFailed(str(exc)) from None

    def migrate_params(self, downtime_ms: int) -> None:
        self.qmp.execute(
            "migrate-set-parameters",
            {"downtime-limit": downtime_ms, "max-bandwidth": QEMU_MAX_BANDWIDTH},
        )

    def wait_migration(self, timeout: float, force_after: float | None = None) -> tuple[Any, bool]:
        """Poll query-migrate until it ends; returns (its last answer, whether forced)."""
        began = time.monotonic()
        forced = False
        while True:
            info = self.qmp.execute("query-migrate")
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            elapsed = time.monotonic() - began
            if force_after is not None and not forced and elapsed > force_after:
                self.qmp.execute(
                    "migrate-set-parameters", {"downtime-limit": QEMU_FORCED_DOWNTIME_MS}
                )
                forced = True
            if elapsed > timeout:
                with contextlib.suppress(QemuFailed):
                    self.qmp.execute("migrate_cancel")
                raise QemuFailed(f"QEMU migration not finished within {timeout:.0f} s")
            time.sleep(0.005)
        if status != "completed":
            raise QemuFailed(f"QEMU migration {status}: {info.get('error-desc', info)}")
        # QEMU 7.2 says "completed" a moment before it fills in the times
        for _ in range(200):
            if info.get("total-time"):
                break
            time.sleep(0.005)
            info = self.qmp.execute("query-migrate")
        return info, forced

    def close(self) -> None:
        self.qmp.close()
        self.kids.kill(self.proc)


def boot_qemu(
    kids: Children,
    qemu: str,
    tmp: Path,
    name: str,
    memory_mib: int,
    options: str,
    ready: Callable[[bytes], bool],
    ready_within: float,
    failures: list[str],
) -> QemuVm:
    """QEMU booting the guest until ``ready(serial output)``; started again (up to
    QEMU_ATTEMPTS times) when KVM's emulator fails under SeaBIOS or it hangs silently,
    both of which happen now and then on this machine's paravirtual KVM."""
    for attempt in range(1, QEMU_ATTEMPTS + 1):
        vm = QemuVm(kids, qemu, tmp, f"{name}-{attempt}", memory_mib, options, incoming=False)
        try:
            # SeaBIOS runs in KVM's instruction emulator here: several seconds to the banner
            vm.wait_output(lambda out: BANNER in out, "the guest's banner", 40)
            vm.wait_output(ready, "the guest ready", ready_within)
            return vm
        except QemuFailed as exc:
            failures.append(str(exc))
            progress(f"QEMU attempt {attempt} ({name}): {exc}")
            vm.close()
    raise QemuFailed(f"{QEMU_ATTEMPTS} attempts failed in a row, the last: {failures[-1]}")


# --- 1. live migration against dirty rate -------------------------------------------------


@dataclass
class MigrationRun:
    total_s: float
    downtime_s: float | None
    rounds: int
    bytes: int
    converged: bool
    #: pages/s: vmipc, dirty pages of every round after the full pass over the seconds of
    #: the rounds during which they were dirtied; QEMU, calc-dirty-rate before the runs
    dirty_rate: float | None
    #: pages/s dirtied in a 1 s window before the runs, measured by the VMM itself (vmipc
    #: dirty-log-start + query-dirty; QEMU calc-dirty-rate in dirty-bitmap mode)
    window_rate: float | None = None
    #: seconds from "completed" on the source to the destination saying running (QEMU)
    dest_running_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def vmipc_dirty_rate(rounds: Sequence[Any]) -> float | None:
    """Pages dirtied per second while the guest ran, from a migration report's rounds:
    the dirty pages reported before each round after the full pass, over the seconds of
    the round before it (when they were dirtied)."""
    if len(rounds) < 2:
        return None
    seconds = sum(r.seconds for r in rounds[:-1])
    pages = sum(r.dirty_pages or 0 for r in rounds[1:])
    return pages / seconds if seconds > 0 else None


def vmipc_window_rate(vm: VmipcVmm) -> float | None:
    """Pages the guest dirties in 1 s, by the VMM's own dirty log (then switched off)."""
    with vm.client(30) as client:
        client.dirty_log_start()
        began = time.perf_counter()
        time.sleep(1.0)
        dirty = client.query_dirty()["dirty_pages"]
        elapsed = time.perf_counter() - began
        client.dirty_log_stop()
    return dirty / elapsed


def migrate_vmipc(
    kids: Children, tmp: Path, level: Level, count: int, warmup: int, notes: list[str]
) -> list[MigrationRun]:
    """Boot a source VMM, then migrate it ``warmup + count`` times, each time into a new
    incoming VMM, which is the source of the next migration."""
    tag = f"mig-{level.ws}"
    src = VmipcVmm(
        kids,
        tmp,
        f"{tag}-src",
        [
            *("--guest", "builtin", "--vcpus", str(VCPUS), "--memory", MIGRATION_MEMORY),
            *("--guest-opt", f"ws={level.ws}", "--guest-opt", f"rate={level.rate}"),
        ],
    )
    runs: list[MigrationRun] = []
    consoles = [src.console]
    try:
        src.wait_output(lambda out: BANNER in out, "the guest's banner", 30)
        if level.touch:
            src.wait_output(lambda out: passes_done(out) == VCPUS, "every vCPU's first pass", 120)
        time.sleep(0.5)
        window = vmipc_window_rate(src)
        time.sleep(0.5)
        for index in range(warmup + count):
            dst = VmipcVmm(
                kids,
                tmp,
                f"{tag}-dst{index}",
                ["--incoming", "--memory", MIGRATION_MEMORY, "--vcpus", str(VCPUS)],
            )
            consoles.append(dst.console)
            with dst.client(30) as client:
                if client.query_status()["state"] != "incoming":
                    raise RuntimeError("the destination VMM is not incoming")
            try:
                report = migrate_blocking(
                    src.socket, dst.socket, policy=MigrationPolicy(force=True)
                )
            except SequenceError as exc:
                notes.append(f"vmipc migration ({level.name}) failed: {exc}")
                dst.quit()
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                src.proc.wait(10)  # the migration told it to quit
            kids.kill(src.proc)
            kids.reap()
            src = dst
            rounds = report.round_details
            if index >= warmup:
                runs.append(
                    MigrationRun(
                        total_s=report.total_s,
                        downtime_s=report.downtime_s,
                        rounds=report.rounds,
                        bytes=report.bytes + report.state_bytes,
                        converged=report.converged,
                        dirty_rate=vmipc_dirty_rate(rounds),
                        window_rate=window,
                        detail={
                            "rounds": [asdict(r) for r in rounds],
                            "predicted_downtime_s": report.predicted_downtime_s,
                        },
                    )
                )
            time.sleep(0.5)  # the guest runs on at the destination (dirty logging is off)
    finally:
        src.quit()
    for console in consoles:
        if b"ERROR" in read(console):
            notes.append(f"vmipc migration ({level.name}): the guest printed an error line")
            break
    return runs


def qemu_dirty_rate(vm: QemuVm) -> float | None:
    """QEMU's own measure of the guest's dirty rate over 1 s (dirty-bitmap mode), pages/s."""
    try:
        vm.qmp.execute("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            info = vm.qmp.execute("query-dirty-rate")
            if info.get("status") == "measured":
                return float(info["dirty-rate"]) * MIB / PAGE  # it says MiB/s
    except QemuFailed:
        return None
    return None


def migrate_qemu(
    kids: Children,
    qemu: str,
    tmp: Path,
    level: Level,
    count: int,
    warmup: int,
    notes: list[str],
    failures: list[str],
) -> list[MigrationRun]:
    tag = f"qmig-{level.ws}"
    memory_mib = parse_mib(MIGRATION_MEMORY)
    ready = (lambda out: passes_done(out) == VCPUS) if level.touch else (lambda out: True)
    src = boot_qemu(kids, qemu, tmp, f"{tag}-src", memory_mib, level.options, ready, 120, failures)
    runs: list[MigrationRun] = []
    consoles = [src.serial]
    try:
        time.sleep(0.5)
        rate = qemu_dirty_rate(src)
        for index in range(warmup + count):
            dst = QemuVm(
                kids, qemu, tmp, f"{tag}-dst{index}", memory_mib, level.options, incoming=True
            )
            consoles.append(dst.serial)
            uri = f"unix:{tmp / f'{tag}-{index}.mig'}"
            dst.qmp.execute("migrate-incoming", {"uri": uri})
            src.migrate_params(MAX_DOWNTIME_MS)
            src.qmp.execute("migrate", {"uri": uri})
            try:
                info, forced = src.wait_migration(120, QEMU_FORCE_AFTER_S)
            except QemuFailed as exc:
                notes.append(f"QEMU migration ({level.name}) failed: {exc}")
                dst.close()
                break
            completed = time.perf_counter()
            wait_for(
                lambda d=dst: d.qmp.execute("query-status")["status"] == "running",
                "the QEMU destination running",
                30,
                0.002,
            )
            dest_running = time.perf_counter() - completed
            src.close()
            kids.reap()
            src = dst
            ram = info.get("ram", {})
            if index >= warmup:
                runs.append(
                    MigrationRun(
                        total_s=info["total-time"] / 1e3,
                        downtime_s=info["downtime"] / 1e3 if "downtime" in info else None,
                        rounds=int(ram.get("dirty-sync-count", 0)),
                        bytes=int(ram.get("transferred", 0)),
                        converged=not forced,
                        dirty_rate=rate,
                        window_rate=rate,
                        dest_running_s=dest_running,
                        detail={"query-migrate": info},
                    )
                )
            time.sleep(0.5)
    finally:
        src.close()
    for console in consoles:
        if b"ERROR" in read(console):
            notes.append(f"QEMU migration ({level.name}): the guest printed an error line")
            break
    return runs


def parse_mib(size: str) -> int:
    return int(size[:-1]) * (1024 if size.endswith("G") else 1)


def bench_migration(
    kids: Children,
    qemu: str | None,
    tmp: Path,
    levels: Sequence[Level],
    count: int,
    notes: list[str],
    failures: list[str],
) -> dict[str, dict[str, list[MigrationRun]]]:
    results: dict[str, dict[str, list[MigrationRun]]] = {}
    for number, level in enumerate(levels):
        warmup = 1 if number == 0 else 0  # the first migrations of the run warm caches
        progress(f"migration, {level.name} ({level.options}): vmipc x{count}")
        entry: dict[str, list[MigrationRun]] = {
            "vmipc": migrate_vmipc(kids, tmp, level, count, warmup, notes)
        }
        if qemu is not None:
            progress(f"migration, {level.name}: QEMU x{count}")
            try:
                entry["qemu"] = migrate_qemu(kids, qemu, tmp, level, count, warmup, notes, failures)
            except QemuFailed as exc:
                notes.append(f"QEMU migration ({level.name}) skipped: {exc}")
                entry["qemu"] = []
        results[level.name] = entry
    return results


def summarize_runs(runs: Sequence[MigrationRun]) -> dict[str, Any]:
    rates = [r.dirty_rate for r in runs if r.dirty_rate is not None]
    windows = [r.window_rate for r in runs if r.window_rate is not None]
    downs = [r.downtime_s for r in runs if r.downtime_s is not None]
    return {
        "n": len(runs),
        "total_s": med([r.total_s for r in runs]),
        "downtime_s": med(downs),
        "rounds": med([float(r.rounds) for r in runs]),
        "bytes": med([float(r.bytes) for r in runs]),
        "dirty_rate": med(rates),
        "window_rate": med(windows),
        "converged": sum(r.converged for r in runs),
    }


def report_migration(
    levels: Sequence[Level], results: dict[str, dict[str, list[MigrationRun]]], count: int
) -> None:
    say(
        f"## 1. Live migration of a {MIGRATION_MEMORY[:-1]} GiB guest ({VCPUS} vCPUs) against "
        f"dirty rate (median of {count})"
    )
    say()
    rows = []
    for level in levels:
        ours = summarize_runs(results[level.name]["vmipc"])
        theirs = summarize_runs(results[level.name].get("qemu", []))
        rows.append(
            [
                f"{level.name} (`{level.options}`)",
                fmt_rate(ours["window_rate"]),
                fmt_rate(theirs["window_rate"]),
                fmt_rate(ours["dirty_rate"]),
                fmt_s(ours["total_s"]),
                fmt_s(theirs["total_s"]),
                ratio(ours["total_s"], theirs["total_s"]),
                fmt_s(ours["downtime_s"]),
                fmt_s(theirs["downtime_s"]),
                ratio(ours["downtime_s"], theirs["downtime_s"]),
            ]
        )
    say(
        table(
            [
                "guest (per vCPU)",
                "dirty pages/s in 1 s, vmipc",
                "in 1 s, QEMU",
                "during the rounds, vmipc",
                "total, vmipc",
                "total, QEMU",
                "vmipc/QEMU",
                "downtime, vmipc",
                "downtime, QEMU",
                "vmipc/QEMU",
            ],
            rows,
        )
    )
    say()
    rows = []
    for level in levels:
        vm_runs = results[level.name]["vmipc"]
        q_runs = results[level.name].get("qemu", [])
        ours, theirs = summarize_runs(vm_runs), summarize_runs(q_runs)
        moved = [run.bytes / run.total_s for run in vm_runs if run.total_s > 0]
        q_moved = [run.bytes / run.total_s for run in q_runs if run.total_s > 0]
        rows.append(
            [
                level.name,
                "—" if ours["rounds"] is None else f"{ours['rounds']:.0f}",
                "—" if theirs["rounds"] is None else f"{theirs['rounds']:.0f}",
                fmt_mib(ours["bytes"]),
                fmt_mib(theirs["bytes"]),
                "—" if not moved else f"{median(moved) / 1e6:,.0f} MB/s",
                "—" if not q_moved else f"{median(q_moved) / 1e6:,.0f} MB/s",
                f"{ours['converged']}/{ours['n']}",
                f"{theirs['converged']}/{theirs['n']}" if q_runs else "—",
            ]
        )
    say(
        table(
            [
                "guest",
                "rounds after the full pass, vmipc",
                "dirty syncs, QEMU",
                "sent, vmipc",
                "sent, QEMU",
                "sent ÷ total, vmipc",
                "sent ÷ total, QEMU",
                "converged, vmipc",
                "converged, QEMU",
            ],
            rows,
        )
    )
    say()
    say(
        f"Both aim at {MAX_DOWNTIME_MS} ms of downtime (vmipc `max_downtime`, QEMU "
        f"`downtime-limit`; QEMU's bandwidth limit lifted). vmipc runs `migrate()` with "
        "`MigrationPolicy(force=True)`: "
        "when its policy gives up (no new low of dirty pages for 3 rounds, 30 rounds, or the "
        "timeout) it stops and copies what is left; QEMU, which never gives up, is made to do "
        f"the same after {QEMU_FORCE_AFTER_S:.0f} s (downtime limit raised to the maximum). "
        "Those runs count as not converged. Downtime: vmipc, source paused → destination "
        "running (`query-status`); QEMU, its `downtime` (source stopped → migration completed "
        "on the source; the destination then said running within a few ms). Total: from the "
        "start of the migration call / `migrate` to the end (QEMU `total-time`). Dirty rate "
        "in 1 s: before the runs, each VMM's own dirty log over 1 s (vmipc `dirty-log-start` + "
        "`query-dirty`, QEMU `calc-dirty-rate` in dirty-bitmap mode); during the rounds: the "
        "dirty pages of every round after vmipc's full pass over the time of the round before "
        "it (the plot's x for vmipc; QEMU's is its 1 s figure). Sent: page streams and state "
        "(QEMU `ram.transferred`)."
    )
    say()


# --- 2. checkpoint ------------------------------------------------------------------------


@dataclass
class CheckpointRun:
    downtime_s: float
    total_s: float
    file_bytes: int
    allocated_bytes: int
    #: QEMU: fsync of the file after cont (vmipc fsyncs after the resume, in its total)
    fsync_s: float | None = None
    #: live: the dump-dirty rounds while the guest ran (after the first copy of RAM)
    rounds: int | None = None
    #: live: the bytes of the last dump-dirty round, written while the guest was paused
    paused_bytes: int | None = None


class LiveRounds:
    """A live checkpoint's client, seen from the side: every call goes to ``client``; its
    dump-dirty rounds are counted, and the bytes of those taken after the pause added up."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.paused = False
        self.rounds = 0
        self.paused_bytes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def pause(self, **options: Any) -> Any:
        reply = await self._client.pause(**options)
        self.paused = True
        return reply

    async def dump_dirty(self, **options: Any) -> Any:
        reply = await self._client.dump_dirty(**options)
        if self.paused:
            self.paused_bytes += reply["bytes"]
        else:
            self.rounds += 1
        return reply


def live_checkpoint(socket_path: str, path: str) -> tuple[SnapshotReport, LiveRounds]:
    """``checkpoint(client, path, mode=Live())`` (verified, as the plain one), with its rounds."""

    async def run() -> tuple[SnapshotReport, LiveRounds]:
        async with open_client(socket_path, client_name="bench_sequences") as client:
            seen = LiveRounds(client)
            return await checkpoint(cast(Client, seen), path, mode=Live()), seen

    return trio.run(run)


def window_dirty(vm: VmipcVmm, seconds: float) -> int:
    """The bytes the guest dirties in ``seconds``, by the VMM's own dirty log (then off)."""
    with vm.client(30) as client:
        client.dirty_log_start()
        time.sleep(seconds)
        dirty = int(client.query_dirty()["dirty_bytes"])
        client.dirty_log_stop()
    return dirty


#: the window of the dirty-rate figure of table 2: 1 s would see each working set whole
SNAP_WINDOW_S = 0.1


def checkpoint_vmipc(
    kids: Children, tmp: Path, size: SnapSize, count: int, notes: list[str]
) -> tuple[list[CheckpointRun], list[CheckpointRun], list[int], Path | None]:
    """``count`` plain and ``count`` live checkpoints of one VM, in pairs whose order
    alternates, the last one plain; returns both, the bytes dirtied in ``SNAP_WINDOW_S``
    (three looks before the checkpoints) and the last plain file. Every file but that one
    is removed before the next checkpoint, so that each is written with no other snapshot
    of this VM in the page cache (new page-cache memory is slow to come by here)."""
    vm = VmipcVmm(
        kids,
        tmp,
        f"ckpt-{size.memory}",
        [
            *("--guest", "builtin", "--vcpus", str(VCPUS), "--memory", size.memory),
            *("--guest-opt", f"ws={size.ws}", "--guest-opt", "rate=0"),
        ],
    )
    plain: list[CheckpointRun] = []
    live: list[CheckpointRun] = []
    dirtied: list[int] = []
    path: Path | None = None
    try:
        vm.wait_output(lambda out: passes_done(out) == VCPUS, "every vCPU's first pass", 180)
        for _ in range(3):
            dirtied.append(window_dirty(vm, SNAP_WINDOW_S))
        for index in range(count):
            kinds = ("live", "plain") if (count - 1 - index) % 2 == 0 else ("plain", "live")
            for kind in kinds:
                if path is not None:  # not the last file: the last checkpoint is a plain one
                    path.unlink()
                    path = None
                if kind == "plain":
                    target = tmp / f"vmipc-{size.memory}-{index}.snap"
                    report = checkpoint_blocking(vm.socket, str(target))
                    path = target
                    stat = path.stat()
                    plain.append(
                        CheckpointRun(
                            report.downtime_s,
                            report.total_s,
                            stat.st_size,
                            stat.st_blocks * 512,
                        )
                    )
                else:
                    live_path = tmp / f"vmipc-live-{size.memory}-{index}.snap"
                    report, seen = live_checkpoint(vm.socket, str(live_path))
                    stat = live_path.stat()
                    live_path.unlink()
                    live.append(
                        CheckpointRun(
                            report.downtime_s,
                            report.total_s,
                            stat.st_size,
                            stat.st_blocks * 512,
                            rounds=seen.rounds,
                            paused_bytes=seen.paused_bytes,
                        )
                    )
                time.sleep(0.3)
    except SequenceError as exc:
        notes.append(f"vmipc checkpoint ({size.label}) failed: {exc}")
    finally:
        vm.quit()
    if b"ERROR" in read(vm.console):
        notes.append(f"vmipc checkpoint ({size.label}): the guest printed an error line")
    return plain, live, dirtied, path


def checkpoint_qemu(
    kids: Children,
    qemu: str,
    tmp: Path,
    size: SnapSize,
    count: int,
    failures: list[str],
) -> tuple[list[CheckpointRun], Path | None]:
    """``stop``, ``getfd`` + ``migrate fd:`` into a new file, ``cont``; then fsync."""
    vm = boot_qemu(
        kids,
        qemu,
        tmp,
        f"qckpt-{size.memory}",
        size.bytes // MIB,
        size.options,
        lambda out: passes_done(out) == VCPUS,
        240,
        failures,
    )
    runs: list[CheckpointRun] = []
    path: Path | None = None
    try:
        # a stopped guest: one pass over RAM, nothing throttled
        vm.migrate_params(QEMU_FORCED_DOWNTIME_MS)
        for index in range(count):
            if path is not None:
                path.unlink()
            path = tmp / f"qemu-{size.memory}-{index}.mig"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                began = time.perf_counter()
                vm.qmp.execute("stop")
                vm.qmp.execute("getfd", {"fdname": "snapshot"}, fd=fd)
                vm.qmp.execute("migrate", {"uri": "fd:snapshot"})
                vm.wait_migration(600)
                vm.qmp.execute("cont")
                resumed = time.perf_counter()
                os.fsync(fd)
                synced = time.perf_counter()
            finally:
                os.close(fd)
            stat = path.stat()
            runs.append(
                CheckpointRun(
                    resumed - began,
                    resumed - began,
                    stat.st_size,
                    stat.st_blocks * 512,
                    fsync_s=synced - resumed,
                )
            )
            time.sleep(0.3)
    finally:
        vm.close()
    return runs, path


def report_checkpoint(
    sizes: Sequence[SnapSize],
    results: dict[str, dict[str, list[CheckpointRun]]],
    dirtied: dict[str, list[int]],
    count: int,
) -> None:
    say(f"## 2. Checkpoint to a file (guest running, RAM mostly touched; median of {count})")
    say()
    rows = []
    for size in sizes:
        ours = results[size.label]["vmipc"]
        live = results[size.label].get("live", [])
        theirs = results[size.label].get("qemu", [])
        down = med([r.downtime_s for r in ours])
        total = med([r.total_s for r in ours])
        l_down = med([r.downtime_s for r in live])
        q_down = med([r.downtime_s for r in theirs])
        q_sync = med([r.downtime_s + (r.fsync_s or 0) for r in theirs])
        rows.append(
            [
                f"{size.label} (`{size.options}`, {size.touched:.0%} touched)",
                fmt_s(down),
                fmt_s(total),
                fmt_s(l_down),
                fmt_s(med([r.total_s for r in live])),
                fmt_s(q_down),
                fmt_s(q_sync),
                ratio(down, q_down),
                ratio(down, q_sync),
                ratio(l_down, q_down),
                fmt_mib(med([float(r.allocated_bytes) for r in ours])),
                fmt_mib(med([float(r.file_bytes) for r in theirs])),
            ]
        )
    say(
        table(
            [
                "guest",
                "vmipc downtime",
                "vmipc total",
                "vmipc live downtime",
                "vmipc live total",
                "QEMU stop → cont",
                "QEMU + fsync",
                "vmipc/QEMU",
                "vmipc/(QEMU + fsync)",
                "live/QEMU",
                "vmipc file (allocated)",
                "QEMU file",
            ],
            rows,
        )
    )
    say()
    rows = []
    for size in sizes:
        live = results[size.label].get("live", [])
        window = dirtied.get(size.label, [])
        rows.append(
            [
                size.label,
                "—"
                if not window
                else f"{fmt_mib(med([float(b) for b in window]))} · {fmt_mib(float(max(window)))}",
                "—" if not live else f"{med([float(r.rounds or 0) for r in live]):.0f}",
                fmt_mib(med([float(r.paused_bytes or 0) for r in live])),
                fmt_mib(med([float(r.allocated_bytes) for r in live])),
            ]
        )
    say(
        table(
            [
                "guest",
                f"dirtied in {SNAP_WINDOW_S * 1e3:.0f} ms (median · most of 3 looks)",
                "live: dump-dirty rounds while running",
                "live: last round, paused",
                "live file (allocated)",
            ],
            rows,
        )
    )
    say()
    say(
        "vmipc plain: `vmipc.sequences.checkpoint` (pause, dump-state and dump-memory into "
        "the file, seal, resume — the downtime — then verify every checksum, fsync, rename; "
        "the total). vmipc live: the same with `mode=Live()`: `dirty-log-start`, a first copy "
        "of RAM (`dump-memory`) while the guest runs, up to 5 `dump-dirty` rounds writing the "
        "pages dirtied meanwhile in place into it, until the rest would take ≤ 20 ms or "
        "stops shrinking; then pause, dump-state and the last `dump-dirty` round, resume — "
        "the downtime — then hash the memory section anew, seal, `dirty-log-stop`, verify, "
        "fsync, rename; the total. Both kinds run on the same VM, in pairs whose order "
        "alternates (the last checkpoint is a plain one, restored in table 3), and both "
        "files are verified. The guests run `rate=0`: each vCPU rewrites its working set "
        "as fast as it can (a write pass, then a read-back pass), so they dirty memory "
        "flat out — not a best case for the live checkpoint. Dirtied in "
        f"{SNAP_WINDOW_S * 1e3:.0f} ms: vmipc's dirty log, before the checkpoints, while "
        "the guest has the machine to itself (during a checkpoint it shares the CPUs with the "
        "VMM's copy and the client). Last round, paused: what the live checkpoint "
        "copied while the guest was paused. QEMU 7.2 has no `file:` migration URI: the "
        "file is passed as an fd (`getfd` + `migrate fd:`), as vmipc's are. Neither "
        "downtime includes an fsync (QEMU does none; vmipc's comes after the resume, in "
        "its total), so vmipc/QEMU and live/QEMU compare like with like; the `+ fsync` "
        "column adds an fsync after `cont`, for a QEMU file as durable as vmipc's."
    )
    say()


# --- 3. restore ---------------------------------------------------------------------------


@dataclass
class RestoreRun:
    #: from spawning the process to running
    running_s: float
    first_line_s: float | None
    #: from the first request to running (the process was up and waiting): the restore
    #: into a waiting VMM, and QEMU's ``migrate-incoming``; None for ``vmm --restore``
    request_s: float | None = None


def first_line_after(path: Path, started: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"\n" in read(path):
            return time.perf_counter() - started
        time.sleep(0.002)
    return None


def restore_vmipc(kids: Children, tmp: Path, snapshot: Path, eager: bool, index: int) -> RestoreRun:
    name = f"restore-{snapshot.stem}-{'eager' if eager else 'lazy'}-{index}"
    vm = VmipcVmm(kids, tmp, name, ["--restore", str(snapshot), *(["--eager"] if eager else [])])
    try:
        with vm.client() as client:
            while client.query_status()["state"] != "running":
                time.sleep(0.002)
            running = time.perf_counter() - vm.started
            first_line = first_line_after(vm.console, vm.started, 60)
            if b"ERROR" in read(vm.console):
                raise RuntimeError(f"the guest restored by vmipc printed: {read(vm.console)!r}")
            client.quit()
        with contextlib.suppress(subprocess.TimeoutExpired):
            vm.proc.wait(10)
    finally:
        vm.quit()
        with contextlib.suppress(FileNotFoundError):
            vm.console.unlink()
    return RestoreRun(running, first_line)


def restore_incoming(kids: Children, tmp: Path, snapshot: Path, index: int) -> RestoreRun:
    """``vmipc restore`` (the sequence) into a ``vmipc vmm --incoming`` that is up and
    waiting (a client connected, ``query-status`` answered): timed from the sequence's
    first request to its return, when ``resume`` has answered (running)."""
    vm = VmipcVmm(kids, tmp, f"restore-{snapshot.stem}-incoming-{index}", ["--incoming"])
    try:
        with vm.client() as client:
            while client.query_status()["state"] != "incoming":
                time.sleep(0.002)

        async def run() -> float:
            async with open_client(vm.socket, client_name="bench_sequences") as client:
                began = time.perf_counter()
                await restore_into(client, str(snapshot))
                return time.perf_counter() - began

        request = trio.run(run)
        running = time.perf_counter() - vm.started
        first_line = first_line_after(vm.console, vm.started, 60)
        if b"ERROR" in read(vm.console):
            raise RuntimeError(f"the guest restored by vmipc printed: {read(vm.console)!r}")
    finally:
        vm.quit()
        with contextlib.suppress(FileNotFoundError):
            vm.console.unlink()
    return RestoreRun(running, first_line, request)


def restore_qemu(
    kids: Children, qemu: str, tmp: Path, snapshot: Path, size: SnapSize, index: int
) -> RestoreRun:
    name = f"qrestore-{size.memory}-{index}"
    vm = QemuVm(kids, qemu, tmp, name, size.bytes // MIB, size.options, incoming=True)
    try:
        fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
        try:
            vm.qmp.execute("getfd", {"fdname": "snapshot"}, fd=fd)
        finally:
            os.close(fd)
        requested = time.perf_counter()
        vm.qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
        vm.wait_migration(600)
        vm.qmp.execute("cont")  # the snapshot was taken stopped: it arrives paused
        done = time.perf_counter()
        running = done - vm.started
        first_line = first_line_after(vm.serial, vm.started, 60)
        if b"ERROR" in read(vm.serial):
            raise QemuFailed(f"the guest restored by QEMU printed: {read(vm.serial)!r}")
    finally:
        vm.close()
        with contextlib.suppress(FileNotFoundError):
            vm.serial.unlink()
    return RestoreRun(running, first_line, done - requested)


def bench_snapshots(
    kids: Children,
    qemu: str | None,
    tmp: Path,
    sizes: Sequence[SnapSize],
    count: int,
    restore_count: int,
    notes: list[str],
    failures: list[str],
) -> tuple[
    dict[str, dict[str, list[CheckpointRun]]],
    dict[str, list[int]],
    dict[str, dict[str, list[RestoreRun]]],
]:
    """Per size: checkpoints by vmipc (plain and live), then by QEMU (each keeps its last
    file; vmipc its last plain one), then the restores of those two files, interleaved;
    the files are removed after."""
    checkpoints: dict[str, dict[str, list[CheckpointRun]]] = {}
    dirtied: dict[str, list[int]] = {}
    restores: dict[str, dict[str, list[RestoreRun]]] = {}
    for size in sizes:
        progress(f"checkpoint, {size.label} guest ({size.options}): vmipc plain + live x{count}")
        ours, live, dirtied[size.label], our_file = checkpoint_vmipc(kids, tmp, size, count, notes)
        checkpoints[size.label] = {"vmipc": ours, "live": live}
        their_file: Path | None = None
        if qemu is not None:
            progress(f"checkpoint, {size.label} guest: QEMU x{count}")
            try:
                theirs, their_file = checkpoint_qemu(kids, qemu, tmp, size, count, failures)
                checkpoints[size.label]["qemu"] = theirs
            except QemuFailed as exc:
                notes.append(f"QEMU checkpoint ({size.label}) skipped: {exc}")
        progress(
            f"restore, {size.label}: vmipc lazy, eager, into --incoming, QEMU, "
            f"x{restore_count} each"
        )
        runs: dict[str, list[RestoreRun]] = {"lazy": [], "eager": [], "incoming": [], "qemu": []}
        for index in range(restore_count):  # interleaved, so noise hits every kind alike
            if our_file is not None:
                for kind in ("lazy", "eager", "incoming"):
                    try:
                        if kind == "incoming":
                            run = restore_incoming(kids, tmp, our_file, index)
                        else:
                            run = restore_vmipc(kids, tmp, our_file, kind == "eager", index)
                        runs[kind].append(run)
                    except (RuntimeError, OSError, TimeoutError, SequenceError) as exc:
                        notes.append(f"vmipc {kind} restore ({size.label}) failed: {exc}")
            if qemu is not None and their_file is not None:
                try:
                    runs["qemu"].append(restore_qemu(kids, qemu, tmp, their_file, size, index))
                except (QemuFailed, OSError, TimeoutError) as exc:
                    notes.append(f"QEMU restore ({size.label}) failed: {exc}")
        restores[size.label] = runs
        for path in (our_file, their_file):
            if path is not None:
                path.unlink()
    return checkpoints, dirtied, restores


def report_restore(
    sizes: Sequence[SnapSize], results: dict[str, dict[str, list[RestoreRun]]], count: int
) -> None:
    say(f"## 3. Restore from the snapshot file to a running guest (median of {count})")
    say()
    rows = []
    for size in sizes:
        runs = results[size.label]
        q_running = med([r.running_s for r in runs["qemu"]])
        q_line = med([r.first_line_s for r in runs["qemu"] if r.first_line_s is not None])
        q_request = med([r.request_s for r in runs["qemu"] if r.request_s is not None])
        for kind, label in (
            ("lazy", "vmipc `vmm --restore` (lazy)"),
            ("eager", "vmipc `vmm --restore --eager`"),
            ("incoming", "vmipc `restore` into a waiting `vmm --incoming`"),
            ("qemu", "QEMU `-incoming defer` + `migrate-incoming fd:` + `cont`"),
        ):
            if not runs.get(kind):
                continue
            running = med([r.running_s for r in runs[kind]])
            line = med([r.first_line_s for r in runs[kind] if r.first_line_s is not None])
            request = med([r.request_s for r in runs[kind] if r.request_s is not None])
            rows.append(
                [
                    size.label,
                    label,
                    fmt_s(running),
                    ratio(running, q_running),
                    fmt_s(line),
                    ratio(line, q_line),
                    fmt_ms(request),
                    ratio(request, q_request) if request is not None else "",
                ]
            )
    say(
        table(
            [
                "snapshot",
                "how",
                "start → running",
                "ratio to QEMU",
                "start → first console line",
                "ratio to QEMU",
                "first request → running",
                "ratio to QEMU",
            ],
            rows,
        )
    )
    say()
    say(
        "Both from spawning the process. Running: vmipc, the first `query-status` on its "
        "socket that says running (the restore into a waiting VMM: `resume` answered); QEMU, "
        "`cont` answered after `migrate-incoming` completed. First request → running "
        "excludes the process's start: `vmipc restore` (`restore_into`, query-status, "
        "load-memory, load-state, resume) into a `vmm --incoming` that already answered "
        "`query-status` on a connected client; QEMU, from `migrate-incoming` (the file's fd "
        "already passed with `getfd`) to `cont` answered. "
        "First console line: the first newline the guest writes after the restore — it "
        "comes at the end of the pass that was under way at the checkpoint, so it includes "
        "the guest re-reading and rewriting the rest of its working set (where a lazy "
        "restore pays for the pages it did not load). The files were just written: they "
        "are read from the page cache."
    )
    say()


# --- the plot -----------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    color: tuple[int, int, int]
    #: per level: (dirty rate pages/s, downtime ms, total s, converged in every run)
    points: list[tuple[float, float, float, bool]]
    #: every run: (dirty rate, downtime ms, total s)
    runs: list[tuple[float, float, float]]


def plot_series(
    levels: Sequence[Level], results: dict[str, dict[str, list[MigrationRun]]]
) -> list[Series]:
    out = []
    for key, name, color in (
        ("vmipc", "vmipc", (31, 119, 180)),
        ("qemu", "QEMU", (230, 110, 0)),
    ):
        points: list[tuple[float, float, float, bool]] = []
        runs: list[tuple[float, float, float]] = []
        for level in levels:
            level_runs = results[level.name].get(key, [])
            summary = summarize_runs(level_runs)
            if summary["dirty_rate"] is None or summary["downtime_s"] is None:
                continue
            points.append(
                (
                    summary["dirty_rate"],
                    summary["downtime_s"] * 1e3,
                    summary["total_s"],
                    summary["converged"] == summary["n"],
                )
            )
            runs += [
                (r.dirty_rate, r.downtime_s * 1e3, r.total_s)
                for r in level_runs
                if r.dirty_rate is not None and r.downtime_s is not None
            ]
        if points:
            out.append(Series(name, color, points, runs))
    return out


PLOT_TITLE = "live migration of a 1 GiB guest, 2 vCPUs: medians (dots: every run)"
PLOT_NOTE = "hollow marker: did not converge, forced stop-and-copy"


def plot_matplotlib(series: Sequence[Series], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, column, ylabel in (
        (axes[0], 1, "downtime (ms)"),
        (axes[1], 2, "total time (s)"),
    ):
        for item in series:
            color = tuple(c / 255 for c in item.color)
            ax.plot(
                [p[0] for p in item.points],
                [p[column] for p in item.points],
                color=color,
                label=item.name,
            )
            for point in item.points:
                ax.plot(
                    point[0],
                    point[column],
                    marker="o",
                    markersize=7,
                    color=color,
                    markerfacecolor=color if point[3] else "white",
                )
            ax.scatter([r[0] for r in item.runs], [r[column] for r in item.runs], s=6, color=color)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.FuncFormatter(
                lambda v, _: (
                    f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
                )
            )
        )
        ax.set_xscale("log")
        ax.set_xlabel("dirty rate (pages/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(title=PLOT_NOTE, title_fontsize="small", loc="upper left")
    fig.suptitle(PLOT_TITLE)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_plot(series: Sequence[Series], path: Path) -> str | None:
    """Draw the PNG with matplotlib (the ``bench`` extra); None when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    plot_matplotlib(series, path)
    return str(path)


# --- main ---------------------------------------------------------------------------------


def describe_tree() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {head}"


def qemu_version(qemu: str | None) -> str:
    if qemu is None:
        return "no QEMU"
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "QEMU version unknown"
    return out.stdout.splitlines()[0] if out.stdout else "QEMU version unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    parser.add_argument("--plot", metavar="PATH", help="the PNG (default: in a new temp dir)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baselines")
    parser.add_argument(
        "--restore-only",
        action="store_true",
        help="checkpoints (once) and restores only, every size (no migration table)",
    )
    parser.add_argument(
        "--sizes", metavar="LABELS", help="comma-separated guest sizes (256M,1G,4G) to run"
    )
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_sequences: /dev/kvm is not usable here; nothing to measure", file=sys.stderr)
        return 1
    # a SIGTERM ends the run through the finally clauses, which kill every child
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    levels: tuple[Level, ...]
    sizes: tuple[SnapSize, ...]
    if args.quick:  # no 8 MiB working set, no 4 GiB guest, fewer repetitions
        levels, sizes = (LEVELS[0], *LEVELS[2:]), SNAP_SIZES[:2]
        migrations, checkpoints, restores = 1, 1, 2
    else:
        levels, sizes = LEVELS, SNAP_SIZES
        migrations, checkpoints, restores = 3, 3, 3
    if args.restore_only:
        levels, sizes, checkpoints = (), SNAP_SIZES, 1
    if args.sizes:
        wanted = args.sizes.split(",")
        sizes = tuple(size for size in SNAP_SIZES if size.memory in wanted)
    notes: list[str] = []
    failures: list[str] = []
    qemu = qemu_or_note(args.no_qemu, notes, progress=progress)

    say_banner(
        "vmipc sequences benchmark", args.quick, f"vmipc at {describe_tree()}", qemu_version(qemu)
    )
    kids = Children()
    tmp = Path(tempfile.mkdtemp(prefix="vmipc-bench-seq-"))
    results: dict[str, Any] = {"quick": args.quick}
    drawn: str | None = None
    try:
        migration = bench_migration(kids, qemu, tmp, levels, migrations, notes, failures)
        if levels:
            report_migration(levels, migration, migrations)
        results["migration"] = {
            level: {side: [asdict(run) for run in runs] for side, runs in entry.items()}
            for level, entry in migration.items()
        }
        saved, dirtied, restored = bench_snapshots(
            kids, qemu, tmp, sizes, checkpoints, restores, notes, failures
        )
        report_checkpoint(sizes, saved, dirtied, checkpoints)
        report_restore(sizes, restored, restores)
        results["checkpoint"] = {
            size: {side: [asdict(run) for run in runs] for side, runs in entry.items()}
            for size, entry in saved.items()
        }
        results["checkpoint_dirtied_bytes"] = dirtied
        results["restore"] = {
            size: {side: [asdict(run) for run in runs] for side, runs in entry.items()}
            for size, entry in restored.items()
        }
        plot_path = Path(args.plot) if args.plot else None
        if levels:
            if plot_path is None:
                plot_dir = tempfile.mkdtemp(prefix="vmipc-bench-seq-plot-")
                plot_path = Path(plot_dir) / "sequences.png"
            drawn = draw_plot(plot_series(levels, migration), plot_path)
        results["plot"] = drawn
    finally:
        kids.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    note_repeated(failures, notes)
    results["notes"] = notes
    results["elapsed_s"] = time.monotonic() - BEGAN
    say_notes(notes)
    if levels and drawn is None:
        say("Plot skipped: matplotlib is missing (`pip install -e '.[bench]'`, or `make bench`).")
        say()
    elif drawn is not None:
        say(f"Plot (downtime and total time against dirty rate): {drawn}")
        say()
    say(f"Total benchmark time: {results['elapsed_s']:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
