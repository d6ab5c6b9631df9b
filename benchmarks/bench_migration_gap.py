#!/usr/bin/env python3
"""Migration gap: what the guest sees of a live migration, vmipc beside QEMU, measured the
same way for both from host timestamps on the guest's console lines.

The guest is the built-in one (``src/vmipc/guest/builtin.elf``), 512 MiB, 1 vCPU of work
plus a heartbeat vCPU: ``vcpus=2 beat=2000 beatonly=1 hz=1000`` makes vCPU 0 print only
``vcpu=0 beat=<k>``, every 2 ms of guest time or as fast as the console allows, while vCPU
1 rewrites its working set (guest/README.md). Each VMM's stdout goes through a pipe into the same
small timestamper process, which stamps every line with CLOCK_MONOTONIC as it arrives. The
*gap* of a migration is the time from the last line the source printed to the first line
the destination printed. Beside it: each VMM's own downtime figure and its total time.

1. Gap at three loads — idle (``ws=4K rate=1``) and two dirty rates (32 MiB and 128 MiB
   working sets rewritten once a second: ``rate`` = pages per second = the working set's
   pages): each a median of 3 migrations, a chain src → dst1 → dst2 → dst3 on one host, the
   guest checked afterwards (heartbeats 1, 2, 3, ... none lost or repeated; every pass line
   what the model says). vmipc: two ``vmipc vmm`` processes, destination ``--incoming``,
   ``vmipc.sequences.migrate_blocking`` with the default policy. QEMU: ``-kernel
   builtin.elf`` with the same options, ``-incoming defer``, migration over a UNIX socket,
   ``downtime-limit`` 50 ms (vmipc's default ``max_downtime``), bandwidth limit lifted.
2. A guest rewriting 32 MiB flat out (``rate=0``) under vmipc's default MigrationPolicy
   (no ``force``), alone and beside a busy host process (a Python spin loop, started and
   killed by this script): converged or not, downtime, the last round's size and time, the
   rounds' throughput, and the gap.
3. vmipc's stop-and-copy step by step, when the migration report carries a ``timeline``
   (otherwise a note says it does not).

Run: ``.venv/bin/python benchmarks/bench_migration_gap.py [--quick] [--count N]
[--json FILE] [--no-qemu]``. About 3 minutes (``--quick``: one migration per row, about
1.5; ``--count N``: N a row, for steadier medians on a noisy machine). Needs a
usable /dev/kvm (as root); QEMU is installed with ``tools/install-system-deps`` when
missing. Every VMM, QEMU, timestamper and spinner this script starts is killed by its pid
on every path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    QemuFailed,
    note_repeated,
    qemu_or_note,
    ratio,
    say,
    say_banner,
    say_notes,
    table,
    write_json,
)
from bench_sequences import (
    BEGAN,
    MAX_DOWNTIME_MS,
    QEMU_ATTEMPTS,
    QEMU_FORCE_AFTER_S,
    Children,
    QemuVm,
    Qmp,
    describe_tree,
    last_words,
    progress,
    qemu_version,
    wait_for,
)

from vmipc.client import SyncClient
from vmipc.guest import BUILTIN_GUEST_PATH, PAGE_SIZE, beat_line, pass_sums
from vmipc.sequences import MigrationNotConverged, MigrationPolicy, SequenceError, migrate_blocking

MIB = 1 << 20
MEMORY = "512M"
MEMORY_MIB = 512
#: vCPU 0 the heartbeat, vCPU 1 the work: every console byte is two port I/O exits, and
#: on a loaded machine a line can take longer than the period, which would starve the work
VCPUS = 2
WORKER = 1
#: the heartbeat: a line every BEAT_US of guest time; HZ makes a sleeping vCPU wake in time
BEAT_US = 2000
HZ = 1000
#: guest pages whose pass sums are checked against the model (Python: ~20 µs a page)
CHECK_PAGES = 300_000
BUSY = "while True: pass"
LINE = re.compile(r"vcpu=(\d+) (?:pass=(\d+) sum=([0-9a-f]{16})|done|beat=(\d+)|ERROR .*)")

# The timestamper: reads a VMM's stdout, writes "<CLOCK_MONOTONIC ns> <line>" per line as it
# arrives; a last line without its newline (a line cut by the migration) is written at EOF
# with "~" before it. The same program reads both VMMs; it runs in a process of its own so
# that neither this script's GIL nor its migration client delays a stamp.
STAMPER = r"""
import os, sys, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
rest = b""
while True:
    data = os.read(0, 65536)
    now = time.monotonic_ns()
    if not data:
        break
    *lines, rest = (rest + data).split(b"\n")
    if lines:
        os.write(out, b"".join(b"%d %s\n" % (now, line) for line in lines))
if rest:
    os.write(out, b"%d ~%s\n" % (time.monotonic_ns(), rest))
"""


@dataclass(frozen=True)
class Level:
    name: str
    ws: str
    rate: int

    @property
    def options(self) -> list[str]:
        return [f"ws={self.ws}", f"rate={self.rate}", f"hz={HZ}", f"beat={BEAT_US}", "beatonly=1"]

    @property
    def ws_bytes(self) -> int:
        return int(self.ws[:-1]) * {"K": 1024, "M": MIB}[self.ws[-1]]


LEVELS = (
    Level("idle", "4K", 1),
    Level("rewriting 32 MiB", "32M", 32 * MIB // PAGE_SIZE),
    Level("rewriting 128 MiB", "128M", 128 * MIB // PAGE_SIZE),
)
FLAT_OUT = Level("32 MiB flat out", "32M", 0)


# --- console lines with host timestamps -----------------------------------------------------


class Stamps:
    """The stamped lines of one VMM's stdout, read incrementally from the timestamper's file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []  # (seconds, line); "~" first: a cut line
        self._offset = 0
        self._rest = b""

    def refresh(self) -> list[tuple[float, str]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        self._offset += len(data)
        *records, self._rest = (self._rest + data).split(b"\n")
        for record in records:
            stamp, _, line = record.partition(b" ")
            self.lines.append((int(stamp) / 1e9, line.decode(errors="replace")))
        return self.lines

    def guest_lines(self) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.refresh() if LINE.fullmatch(line.lstrip("~"))]

    def count(self, kind: str) -> int:
        """How many complete ``beat=`` or ``pass=`` lines so far."""
        return sum(1 for _, line in self.refresh() if f" {kind}=" in line and line[:1] != "~")


class Piped:
    """A VMM process whose stdout goes through a pipe into a timestamper process."""

    def __init__(self, kids: Children, tmp: Path, name: str, argv: Sequence[str]) -> None:
        self.kids = kids
        self.name = name
        self.stderr = tmp / f"{name}.stderr"
        self.stamps = Stamps(tmp / f"{name}.stamps")
        read_end, write_end = os.pipe()
        try:
            with self.stderr.open("wb") as err:
                self.proc = subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=write_end, stderr=err
                )
                kids.procs.append(self.proc)
                self.stamper = subprocess.Popen(
                    [sys.executable, "-c", STAMPER, str(self.stamps.path)],
                    stdin=read_end,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
                kids.procs.append(self.stamper)
        finally:
            os.close(read_end)
            os.close(write_end)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.why()}")

    def why(self) -> str:
        return last_words(self.stderr)

    def wait_lines(self, kind: str, count: int, timeout: float) -> None:
        def ready() -> bool:
            self.check_alive()
            if "ERROR" in "".join(line for _, line in self.stamps.lines[-20:]):
                raise RuntimeError(f"{self.name}: the guest printed an error line")
            return self.stamps.count(kind) >= count

        wait_for(ready, f"{self.name}: {count} {kind} lines", timeout)

    def finished(self) -> None:
        """Kill the VMM (if it has not quit) and let the timestamper write the last line."""
        self.kids.kill(self.proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stamper.wait(10)
        self.kids.kill(self.stamper)
        self.stamps.refresh()


class VmipcVmm(Piped):
    def __init__(self, kids: Children, tmp: Path, name: str, args: Sequence[str]) -> None:
        self.socket = str(tmp / f"{name}.sock")
        argv = [sys.executable, "-m", "vmipc", "vmm", *args, "--socket", self.socket]
        super().__init__(kids, tmp, name, [*argv, "--console", "-", "--no-console-input"])

    def wait_socket(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with SyncClient(self.socket, timeout=30, client_name="bench_gap") as client:
                    return str(client.query_status()["state"])
            except (FileNotFoundError, ConnectionRefusedError):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def quit(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                with SyncClient(self.socket, timeout=10) as client:
                    client.quit()
                self.proc.wait(10)
        self.finished()


class QemuPiped(QemuVm, Piped):
    """QEMU + KVM with the built-in guest on ``-serial stdio`` (piped and stamped), or waiting
    for ``-incoming defer``; QMP, migration parameters and polling come from bench_sequences."""

    def __init__(
        self, kids: Children, qemu: str, tmp: Path, name: str, options: str, *, incoming: bool
    ) -> None:
        qmp_path = str(tmp / f"{name}.qmp")
        argv = [qemu, "-accel", "kvm", "-m", str(MEMORY_MIB), "-smp", str(VCPUS)]
        argv += ["-kernel", str(BUILTIN_GUEST_PATH), "-append", f"vcpus={VCPUS} {options}"]
        argv += ["-display", "none", "-serial", "stdio", "-monitor", "none"]
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        Piped.__init__(self, kids, tmp, name, argv)
        self.serial = self.stamps.path
        try:
            self.qmp = Qmp(qmp_path, self.proc, self.stderr)
        except BaseException:
            self.finished()
            raise

    def check_alive(self) -> None:
        self.check()

    def close(self) -> None:
        self.qmp.close()
        self.finished()


# --- one migration: the gap and the figures -------------------------------------------------


@dataclass
class Hop:
    gap_s: float | None
    downtime_s: float | None
    total_s: float
    converged: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


def gap_between(src: Stamps, dst: Stamps) -> float | None:
    """From the last complete line the source printed to the first line the destination
    printed (a line cut by the migration completes there)."""
    before = [t for t, line in src.guest_lines() if not line.startswith("~")]
    after = [t for t, line in dst.refresh()]
    if not before or not after:
        return None
    return after[0] - before[-1]


def check_chain(consoles: Sequence[Stamps], ws: int) -> str | None:
    """What is wrong with the guest's console over a chain of migrations, or None: beats 1, 2,
    3, ... with none lost or repeated, pass lines numbered 1, 2, 3, ... and (for the first
    CHECK_PAGES pages' worth of passes) each sum what the model says; no error line."""
    text = ""
    for stamps in consoles:
        for _, line in stamps.refresh():
            text += line[1:] if line.startswith("~") else line + "\n"
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("vmipc-guest ")), None)
    if start is None:
        return "no banner"
    beats = passes = 0
    sums = pass_sums(WORKER, ws)
    for line in lines[start + 1 : -1]:
        match = LINE.fullmatch(line)
        if match is None or "ERROR" in line:
            return f"unexpected line {line[:80]!r}"
        if match.group(4):
            if line != beat_line(beats + 1):
                return f"{line!r} after beat {beats}"
            beats += 1
        elif match.group(2):
            if int(match.group(2)) != passes + 1:
                return f"{line!r} after pass {passes}"
            passes += 1
            if passes * ws // PAGE_SIZE <= CHECK_PAGES and match.group(3) != f"{next(sums):016x}":
                return f"pass {passes}: sum {match.group(3)} is not the model's"
    return None if beats else "no heartbeat"


def timeline_of(report: Any) -> list[tuple[str, float, float | None]]:
    """(step, client seconds, VMM seconds or None) of the stop-and-copy (phases ``paused``
    and ``switch-over``) from the report's ``timeline``, if this vmipc's report has one
    (docs/sequences.md#timelines); read loosely, so that it works with or without it."""
    steps: list[tuple[str, float, float | None]] = []
    for entry in getattr(report, "timeline", None) or ():
        name = getattr(entry, "name", None)
        seconds = getattr(entry, "duration_s", None)
        phase = getattr(entry, "phase", None)
        if not isinstance(name, str) or not isinstance(seconds, int | float):
            continue
        if phase not in (None, "paused", "switch-over"):
            continue
        within = getattr(entry, "within", None)
        label = f"{name} ({within})" if within else name
        # the VMM's own time: the replies' ran_s, None when the VMM reported none
        ran = [getattr(t, "ran_s", None) for t in getattr(entry, "server", ()) or ()]
        ran_s = [r for r in ran if isinstance(r, int | float)]
        server = sum(ran_s) if ran_s else None
        steps.append((label, float(seconds), float(server) if server is not None else None))
    return steps


def round_figures(report: Any) -> dict[str, Any]:
    rounds = list(report.round_details)
    last = rounds[-1] if rounds else None
    moved = sum(r.bytes for r in rounds)
    took = sum(r.seconds for r in rounds)
    return {
        "rounds": len(rounds),
        "last_round_bytes": last.bytes if last else None,
        "last_round_s": last.seconds if last else None,
        "last_round_kind": last.kind if last else None,
        "throughput": moved / took if took > 0 else None,
        "last_round_throughput": last.bytes / last.seconds if last and last.seconds > 0 else None,
        "round_details": [asdict(r) for r in rounds],
        "timeline": timeline_of(report),
        "predicted_downtime_s": report.predicted_downtime_s,
    }


def vmipc_chain(
    kids: Children,
    tmp: Path,
    level: Level,
    count: int,
    policy: MigrationPolicy,
    notes: list[str],
    tag: str,
) -> list[Hop]:
    """Boot a source, then ``count`` migrations, each into a new incoming VMM that becomes
    the next source; a migration that gives up leaves the source running and is counted."""
    guest = [f"--guest-opt={option}" for option in level.options]
    base = ["--memory", MEMORY, "--vcpus", str(VCPUS)]
    src = VmipcVmm(kids, tmp, f"{tag}-src", ["--guest", "builtin", *base, *guest])
    consoles = [src.stamps]
    hops: list[Hop] = []
    try:
        src.wait_lines("pass", 1, 180)  # the working set is written once
        src.wait_lines("beat", 10, 30)
        for index in range(count):
            dst = VmipcVmm(kids, tmp, f"{tag}-dst{index}", ["--incoming", *base])
            if dst.wait_socket() != "incoming":
                raise RuntimeError("the destination VMM is not incoming")
            try:
                report = migrate_blocking(src.socket, dst.socket, policy=policy)
            except MigrationNotConverged as exc:
                dst.quit()
                hops.append(Hop(None, None, exc.report.total_s, False, round_figures(exc.report)))
                time.sleep(0.5)
                continue
            except SequenceError as exc:
                notes.append(f"vmipc migration ({level.name}) failed: {exc}")
                dst.quit()
                break
            consoles.append(dst.stamps)
            dst.wait_lines("beat", dst.stamps.count("beat") + 5, 30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                src.proc.wait(10)  # the migration told it to quit
            src.finished()
            hops.append(
                Hop(
                    gap_between(src.stamps, dst.stamps),
                    report.downtime_s,
                    report.total_s,
                    report.converged,
                    round_figures(report),
                )
            )
            src = dst
            time.sleep(0.5)  # the guest runs on at the destination
    finally:
        src.quit()
    wrong = check_chain(consoles, level.ws_bytes)
    if wrong:
        notes.append(f"vmipc ({level.name}): the guest did not continue exactly: {wrong}")
    return hops


def boot_qemu(
    kids: Children, qemu: str, tmp: Path, name: str, level: Level, failures: list[str]
) -> QemuPiped:
    options = " ".join(level.options)
    for attempt in range(1, QEMU_ATTEMPTS + 1):
        vm = QemuPiped(kids, qemu, tmp, f"{name}-{attempt}", options, incoming=False)
        try:
            # SeaBIOS runs in KVM's instruction emulator here: seconds to the banner
            vm.wait_lines("pass", 1, 180)
            vm.wait_lines("beat", 10, 30)
            return vm
        except (QemuFailed, RuntimeError, TimeoutError) as exc:
            failures.append(str(exc))
            progress(f"QEMU attempt {attempt} ({name}): {exc}")
            vm.close()
    raise QemuFailed(f"{QEMU_ATTEMPTS} attempts failed in a row, the last: {failures[-1]}")


def qemu_chain(
    kids: Children,
    qemu: str,
    tmp: Path,
    level: Level,
    count: int,
    notes: list[str],
    failures: list[str],
) -> list[Hop]:
    tag = f"q{level.ws}"
    src = boot_qemu(kids, qemu, tmp, f"{tag}-src", level, failures)
    consoles = [src.stamps]
    hops: list[Hop] = []
    try:
        for index in range(count):
            dst = QemuPiped(
                kids, qemu, tmp, f"{tag}-dst{index}", " ".join(level.options), incoming=True
            )
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
            consoles.append(dst.stamps)
            dst.wait_lines("beat", 5, 30)
            src.close()
            hops.append(
                Hop(
                    gap_between(src.stamps, dst.stamps),
                    info["downtime"] / 1e3 if "downtime" in info else None,
                    info["total-time"] / 1e3,
                    not forced,
                    {"query-migrate": info},
                )
            )
            src = dst
            time.sleep(0.5)
    finally:
        src.close()
    wrong = check_chain(consoles, level.ws_bytes)
    if wrong:
        notes.append(f"QEMU ({level.name}): the guest did not continue exactly: {wrong}")
    return hops


# --- tables ---------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f} ms"


def fmt_gbs(rate: float | None) -> str:
    return "—" if rate is None else f"{rate / 1e9:.2f} GB/s"


def report_gap(results: dict[str, dict[str, list[Hop]]], count: int) -> None:
    say(f"## 1. Guest-visible gap: {MEMORY}iB, 1 vCPU of work + a heartbeat vCPU ({BEAT_US} µs)")
    say()
    rows = []
    for level in LEVELS:
        ours, theirs = results[level.name]["vmipc"], results[level.name].get("qemu", [])
        figures = []
        for attr in ("gap_s", "downtime_s", "total_s"):
            a = med([getattr(h, attr) for h in ours])
            b = med([getattr(h, attr) for h in theirs])
            figures += [fmt_ms(a), fmt_ms(b), ratio(a, b)]
        runs = [f"{sum(h.converged for h in hops)}/{len(hops)}" for hops in (ours, theirs)]
        rows.append([level.name, *figures, " · ".join(runs)])
    say(
        table(
            [
                "guest",
                "gap, vmipc",
                "gap, QEMU",
                "vmipc/QEMU",
                "downtime (own), vmipc",
                "downtime (own), QEMU",
                "vmipc/QEMU",
                "total, vmipc",
                "total, QEMU",
                "vmipc/QEMU",
                "converged, vmipc · QEMU",
            ],
            rows,
        )
    )
    say()
    say(
        f"Medians of {count} migrations each. Gap: host "
        "CLOCK_MONOTONIC stamps on the console lines, taken by the same timestamper process "
        "reading each VMM's stdout pipe, from the source's last line to the destination's "
        f"first; it includes up to one heartbeat period ({BEAT_US / 1000:.0f} ms) because "
        "both VMMs stop the guest clock while paused. Downtime (own): vmipc's report (pause "
        "→ destination running), QEMU's query-migrate `downtime`. Total: vmipc's report, "
        "QEMU's `total-time`. Idle: `ws=4K rate=1`; the dirty rates rewrite the working set "
        f"once a second. Both aim at {MAX_DOWNTIME_MS} ms."
    )
    say()


def report_flat_out(results: dict[str, list[Hop]], count: int) -> None:
    say("## 2. A guest rewriting 32 MiB flat out (`ws=32M rate=0`), default MigrationPolicy")
    say()
    rows = []
    for condition, hops in results.items():
        converged = sum(1 for h in hops if h.converged)
        done = [h for h in hops if h.converged]

        def pick(key: str, among: Sequence[Hop]) -> float | None:
            return med([h.detail.get(key) for h in among])

        last_bytes = pick("last_round_bytes", done)
        rows.append(
            [
                condition,
                f"{converged}/{len(hops)}",
                fmt_ms(med([h.downtime_s for h in done])),
                fmt_ms(med([h.gap_s for h in done])),
                "—" if last_bytes is None else f"{last_bytes / MIB:.1f} MiB",
                fmt_ms(pick("last_round_s", done)),
                fmt_gbs(pick("last_round_throughput", done)),
                fmt_gbs(pick("throughput", hops)),
                f"{med([h.detail.get('rounds') for h in hops]) or 0:.0f}",
                fmt_ms(med([h.total_s for h in hops])),
            ]
        )
    say(
        table(
            [
                "host",
                "converged",
                "downtime",
                "gap",
                "last round",
                "last round time",
                "last round rate",
                "all rounds rate",
                "rounds",
                "total",
            ],
            rows,
        )
    )
    say()
    say(
        f"{count} migrations per row, medians (downtime, gap and the last round over those "
        "that converged). Converged: pre-copy met the default policy (50 ms predicted "
        "downtime) before it gave up; a migration that gave up left the source running. "
        "Busy: one Python spin loop on the host for the whole row. Round rates: bytes of page "
        "streams over the seconds of the transfers, VMM to VMM."
    )
    say()


def report_timeline(hops: Sequence[Hop]) -> None:
    say("## 3. vmipc stop-and-copy, step by step")
    say()
    per_step: dict[str, list[tuple[float, float | None]]] = {}
    for hop in hops:
        for name, seconds, server in hop.detail.get("timeline") or ():
            per_step.setdefault(name, []).append((seconds, server))
    if not per_step:
        say("This vmipc's MigrationReport has no `timeline`: no step-by-step breakdown.")
        say()
        return
    rows = [
        [name, fmt_ms(med([s for s, _ in values])), fmt_ms(med([v for _, v in values]))]
        for name, values in per_step.items()
    ]
    say(table(["step (source/destination: the sides of a transfer)", "client", "VMM"], rows))
    say()
    say(
        f"Medians over the {len(hops)} vmipc migrations of table 1, steps of the phases "
        "`paused` and `switch-over` from the report's `timeline`; client: the step as the "
        "client saw it, VMM: the VMM's own running time for it (protocol 1.8; — before)."
    )
    say()


# --- main -----------------------------------------------------------------------------------


def bench_flat_out(kids: Children, tmp: Path, count: int, notes: list[str]) -> dict[str, list[Hop]]:
    results: dict[str, list[Hop]] = {}
    for condition in ("alone", "one busy process"):
        progress(f"flat out 32 MiB, {condition}: vmipc x{count}")
        spinner = None
        if condition != "alone":
            spinner = subprocess.Popen(
                [sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
            kids.procs.append(spinner)
        try:
            results[condition] = vmipc_chain(
                kids, tmp, FLAT_OUT, count, MigrationPolicy(), notes, f"flat-{len(results)}"
            )
        finally:
            if spinner is not None:
                kids.kill(spinner)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one migration per row")
    parser.add_argument(
        "--count", type=int, metavar="N", help="migrations per row (default 3, --quick 1)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baselines")
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_migration_gap: /dev/kvm is not usable here", file=sys.stderr)
        return 1
    # a SIGTERM ends the run through the finally clauses, which kill every child
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    count = args.count or (1 if args.quick else 3)
    notes: list[str] = []
    failures: list[str] = []
    qemu = qemu_or_note(args.no_qemu, notes, progress=progress)
    say_banner(
        "vmipc migration gap benchmark",
        args.quick,
        f"vmipc at {describe_tree()}",
        qemu_version(qemu),
    )
    kids = Children()
    tmp = Path(tempfile.mkdtemp(prefix="vmipc-bench-gap-"))
    results: dict[str, Any] = {"quick": args.quick}
    try:
        gap: dict[str, dict[str, list[Hop]]] = {}
        for level in LEVELS:
            progress(f"gap, {level.name}: vmipc x{count}")
            entry = gap[level.name] = {
                "vmipc": vmipc_chain(
                    kids, tmp, level, count, MigrationPolicy(), notes, f"v{level.ws}"
                )
            }
            if qemu is not None:
                progress(f"gap, {level.name}: QEMU x{count}")
                try:
                    entry["qemu"] = qemu_chain(kids, qemu, tmp, level, count, notes, failures)
                except (QemuFailed, RuntimeError, TimeoutError) as exc:
                    notes.append(f"QEMU ({level.name}) skipped: {exc}")
            kids.reap()
        report_gap(gap, count)
        flat = bench_flat_out(kids, tmp, count, notes)
        report_flat_out(flat, count)
        report_timeline([h for entry in gap.values() for h in entry["vmipc"]])
        results["gap"] = {
            name: {side: [asdict(h) for h in hops] for side, hops in entry.items()}
            for name, entry in gap.items()
        }
        results["flat_out"] = {c: [asdict(h) for h in hops] for c, hops in flat.items()}
    finally:
        kids.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    note_repeated(failures, notes)
    results["notes"] = notes
    results["elapsed_s"] = time.monotonic() - BEGAN
    say_notes(notes)
    say(f"Total benchmark time: {results['elapsed_s']:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
