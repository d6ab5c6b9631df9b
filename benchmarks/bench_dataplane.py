#!/usr/bin/env python3
"""How fast do guest pages go from one VMM to another, against a plain socket copy?

Prints a Markdown table of medians with ratios against a baseline measured in the same
run, so a noisy shared machine affects both sides alike. Two ``python -m vmipc vmm``
processes, as a migration on one host uses them: a source running the built-in guest,
mostly touched (``ws`` ~ 90 % of RAM, ``rate=0``), paused after its first pass, and an
``--incoming`` VMM of the same size. Each row moves the guest's RAM through a fresh
AF_UNIX socket pair, the way ``vmipc migrate`` does (``sequences/_migrate.py``
``run_transfer`` + ``LocalDestination``): the source writes one end, the destination reads
the other, both requests in flight at once, timed from before both calls to after both
replies:

* ``dump-memory format=stream`` -> ``apply-pages`` (VMM to VMM, with full checksums: the
  path of a migration to another host, and of one to an older VMM);
* the same with ``checksum=headers`` -> ``apply-pages accept_unhashed`` (protocol 1.10, page
  stream 1.1: the pages are not hashed; what ``vmipc migrate`` uses on the socket pairs it
  makes itself);
* ``dump-memory format=raw`` -> ``load-memory format=raw``;
* the sender alone: ``dump-memory format=stream`` (hashed, and unhashed) -> this process
  ``recv_into`` a buffer;
* the receiver alone: the same stream, saved once, ``sendfile``d by a helper process ->
  ``apply-pages``;

beside the baseline, a **plain copy** of as many bytes between two processes: a helper
process ``sendfile``s from the guest's own memfd (reopened through ``/proc/PID/fd``) into
one end, this process ``recv_into`` a preallocated, already-touched buffer from the other.

Then the issue's busy guest (512 MiB, 1 vCPU, ``ws=32M rate=0``) migrated with the default
``MigrationPolicy`` between two VMM processes (``migrate_blocking``): whether it converged,
its downtime, and how fast its rounds went beside the plain copy.

Run: ``.venv/bin/python benchmarks/bench_dataplane.py [--quick] [--rounds N]
[--migrations N] [--json FILE] [--baseline-src DIR]``; with ``--baseline-src`` two more VMMs
run the vmipc of another tree (``DIR`` is its ``src/``) and its stream and sender-alone rows
join every round, to compare a change with its parent in the same conditions. The
default run (a 1 GiB guest, 2 vCPUs, 5 rounds, 5 migrations) takes about 1.5 minutes;
``--quick`` (512 MiB, 1 vCPU, 3 rounds, 3 migrations) about one. Needs a usable /dev/kvm (as root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

from _common import gbps, median, progress, ratio, say, say_notes, table, tail, wait_for

from vmipc.client import SyncClient
from vmipc.memory_layout import PAGE_SIZE
from vmipc.sequences import MigrationNotConverged, MigrationReport, migrate_blocking

MIB = 1 << 20
GIB = 1 << 30
#: recv_into this much at a time (as the VMM's receive path reads at most 1 MiB a call)
RECV_CHUNK = 1 << 20

#: The baseline's (and the receiver-alone row's) sender: sendfile ``count`` bytes of the
#: file at argv[1] from offset 0 into fd argv[2] once this process reads a byte from it.
SENDER = r"""
import os, sys
src = os.open(sys.argv[1], os.O_RDONLY)
out, count = int(sys.argv[2]), int(sys.argv[3])
os.read(out, 1)
offset = 0
while offset < count:
    moved = os.sendfile(out, src, offset, min(count - offset, 1 << 30))
    if moved == 0:
        break
    offset += moved
"""


@dataclass(frozen=True)
class GuestSpec:
    size: int
    vcpus: int
    ws: str

    @property
    def label(self) -> str:
        size = f"{self.size // GIB} GiB" if self.size >= GIB else f"{self.size // MIB} MiB"
        return f"{size}, {self.vcpus} vCPU{'s' if self.vcpus > 1 else ''}, ws={self.ws}"


class Vmm:
    """``python -m vmipc vmm`` in its own process: a source running the built-in guest
    (paused after every vCPU's first pass) or an ``--incoming`` VMM of the same size."""

    def __init__(
        self,
        spec: GuestSpec,
        tmp: str,
        name: str,
        *,
        incoming: bool,
        pause: bool = True,
        src: str | None = None,
    ) -> None:
        self.spec = spec
        self.socket_path = os.path.join(tmp, f"{name}.sock")
        self.console = Path(tmp) / f"{name}-console.txt"
        self.stderr = Path(tmp) / f"{name}-stderr.txt"
        argv = [sys.executable, "-m", "vmipc", "vmm", "--socket", self.socket_path]
        argv += ["--memory", f"{spec.size // MIB}M", "--vcpus", str(spec.vcpus)]
        if incoming:
            argv += ["--incoming"]
        else:
            argv += ["--guest", "builtin", "--guest-opt", f"ws={spec.ws}", "--guest-opt", "rate=0"]
        argv += ["--console", str(self.console), "--no-console-input"]
        self.client: SyncClient | None = None
        env = None
        if src is not None:  # another tree's vmipc (the --baseline-src rows)
            env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, env=env)
        try:
            ready = self._socket_ready if incoming else self._pass_one_done
            wait_for(ready, f"the {name} VMM", 180)
            self.client = SyncClient(self.socket_path, timeout=600, client_name="bench_dataplane")
            if not incoming and pause:
                self.client.pause()
        except BaseException:
            self.close()
            raise

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vmipc vmm exited {self.proc.returncode}: {tail(self.stderr)}")

    def _socket_ready(self) -> bool:
        self._alive()
        return os.path.exists(self.socket_path)

    def _pass_one_done(self) -> bool:
        self._alive()
        console = self.console.read_bytes() if self.console.exists() else b""
        done = all(f"vcpu={i} pass=1 ".encode() in console for i in range(self.spec.vcpus))
        return done and os.path.exists(self.socket_path)

    def memfd_path(self) -> str:
        """The path through which another process opens the guest's memfd."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{name}")
                ours = target.startswith("/memfd:vmipc-guest-ram")
                if ours and os.stat(f"{fd_dir}/{name}").st_size == self.spec.size:
                    return f"{fd_dir}/{name}"
        raise RuntimeError("the guest's memfd was not found under /proc")

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


# --- the two ends of one transfer ------------------------------------------------------------

#: one end of a transfer: given its socket end, moves the bytes and returns how many
End = Callable[[socket.socket], int]


def both(send: End, receive: End) -> tuple[float, int]:
    """Run ``send`` and ``receive`` on the two ends of a fresh socket pair, concurrently;
    (seconds from before both to after both, the bytes the receiver reports)."""
    left, right = socket.socketpair()
    results: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, end: End, sock: socket.socket) -> None:
        try:
            results[name] = end(sock)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    try:
        start = time.perf_counter()
        sender = threading.Thread(target=run, args=("send", send, left))
        sender.start()
        run("receive", receive, right)
        sender.join()
        seconds = time.perf_counter() - start
    finally:
        left.close()
        right.close()
    if errors:
        raise errors[0]
    return seconds, results["receive"]


def recv_all(buffer: memoryview) -> End:
    """Receive until the sender closes, into ``buffer`` (wrapping round when it is full)."""

    def receive(sock: socket.socket) -> int:
        got = 0
        size = len(buffer)
        while True:
            at = got % size
            moved = sock.recv_into(buffer[at : at + min(RECV_CHUNK, size - at)])
            if not moved:
                return got
            got += moved

    return receive


def timed_plain(path: str, count: int, buffer: memoryview) -> tuple[float, int]:
    """The plain copy: a started helper process sendfiles ``count`` bytes of ``path`` into
    one end, this process recv_into ``buffer`` from the other; timed from the go byte (the
    helper's start-up is not) to the last byte."""
    left, right = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, path, str(left.fileno()), str(count)],
        pass_fds=(left.fileno(),),
    )
    try:
        left.close()
        time.sleep(0.3)  # let the helper reach its read of the go byte
        receive = recv_all(buffer)
        start = time.perf_counter()
        right.send(b"g")
        got = receive(right)
        seconds = time.perf_counter() - start
        if proc.wait(600) or got != count:
            raise RuntimeError(f"the plain copy moved {got} of {count} bytes")
    finally:
        right.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return seconds, count


def timed_saved_stream(path: str, count: int, dest: SyncClient) -> tuple[float, int]:
    """The receiver alone: a started helper sendfiles the saved stream into one end,
    ``apply-pages`` reads the other; timed from the go byte to the reply."""
    left, right = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, path, str(left.fileno()), str(count)],
        pass_fds=(left.fileno(),),
    )
    try:
        left.close()
        time.sleep(0.3)  # let the helper reach its read of the go byte
        # the go byte goes the other way (to the helper's end): apply-pages on ``right``
        # reads only what the helper writes
        start = time.perf_counter()
        right.send(b"g")
        reply = dest.apply_pages(in_=right.fileno())
        seconds = time.perf_counter() - start
        if proc.wait(600):
            raise RuntimeError(f"the sender exited {proc.returncode}")
    finally:
        right.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return seconds, int(reply["bytes"])


# --- the run ---------------------------------------------------------------------------------

ROWS = {
    "stream": "`dump-memory` stream → `apply-pages` (VMM to VMM)",
    "unhashed": "`dump-memory` stream `checksum=headers` → `apply-pages accept_unhashed`",
    "raw": "`dump-memory` raw → `load-memory` raw (VMM to VMM)",
    "sender": "sender alone: `dump-memory` stream → `recv_into` a buffer",
    "sender-unhashed": "sender alone: the same, `checksum=headers`",
    "receiver": "receiver alone: the saved stream, `sendfile`d → `apply-pages`",
    "plain": "**plain copy**: `sendfile` from the guest memfd → `recv_into` a buffer",
}


#: rows of the --baseline-src VMMs (another tree's vmipc), beside the same rows of this one
BASELINE_ROWS = {
    "stream-baseline": "baseline tree: `dump-memory` stream → `apply-pages`",
    "sender-baseline": "baseline tree: sender alone",
}


def bench(spec: GuestSpec, rounds: int, tmp: str, baseline: str | None = None) -> dict[str, Any]:
    source = dest = old_source = old_dest = None
    saved_fd = -1
    buffer: mmap.mmap | None = None
    rows = {**ROWS, **(BASELINE_ROWS if baseline else {})}
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in rows}
    try:
        progress(f"starting the source ({spec.label}) and the incoming VMM")
        source = Vmm(spec, tmp, "source", incoming=False)
        dest = Vmm(spec, tmp, "dest", incoming=True)
        src, dst = source.client, dest.client
        assert src is not None and dst is not None
        memfd = source.memfd_path()
        buffer = mmap.mmap(-1, spec.size)
        buffer[:] = bytes(spec.size)  # touched: recv_into never faults in fresh pages
        view = memoryview(buffer)
        # the saved stream for the receiver-alone row (a memfd: pwrite path, no holes)
        saved_fd = os.memfd_create("bench-stream")
        stream_bytes = int(src.dump_memory(format="stream", out=saved_fd)["bytes"])

        if baseline:
            progress(f"starting the baseline tree's VMMs ({baseline})")
            old_source = Vmm(spec, tmp, "old-source", incoming=False, src=baseline)
            old_dest = Vmm(spec, tmp, "old-dest", incoming=True, src=baseline)

        def dump(fmt: str, client: SyncClient = src, *, hashed: bool = True) -> End:
            # (the argument only when asked: a --baseline-src tree may not know it)
            extra: dict[str, Any] = {} if hashed else {"checksum": "headers"}

            def send(sock: socket.socket) -> int:
                reply = client.dump_memory(format=fmt, out=sock.fileno(), **extra)  # type: ignore[arg-type]
                sock.shutdown(socket.SHUT_WR)
                return int(reply["bytes"])

            return send

        def load(fmt: str, client: SyncClient = dst, *, hashed: bool = True) -> End:
            extra: dict[str, Any] = {} if hashed else {"accept_unhashed": True}

            def receive(sock: socket.socket) -> int:
                if fmt == "stream":
                    return int(client.apply_pages(in_=sock.fileno(), **extra)["bytes"])
                return int(client.load_memory(format="raw", in_=sock.fileno())["bytes"])

            return receive

        runs: dict[str, Callable[[], tuple[float, int]]] = {
            "stream": lambda: both(dump("stream"), load("stream")),
            "unhashed": lambda: both(dump("stream", hashed=False), load("stream", hashed=False)),
            "raw": lambda: both(dump("raw"), load("raw")),
            "sender": lambda: both(dump("stream"), recv_all(view)),
            "sender-unhashed": lambda: both(dump("stream", hashed=False), recv_all(view)),
            "receiver": lambda: timed_saved_stream(
                f"/proc/{os.getpid()}/fd/{saved_fd}", stream_bytes, dst
            ),
            "plain": lambda: timed_plain(memfd, stream_bytes, view),
        }
        if old_source is not None and old_dest is not None:
            old_src, old_dst = old_source.client, old_dest.client
            assert old_src is not None and old_dst is not None
            runs["stream-baseline"] = lambda: both(dump("stream", old_src), load("stream", old_dst))
            runs["sender-baseline"] = lambda: both(dump("stream", old_src), recv_all(view))
        names = list(rows)
        for round_index in range(rounds + 1):  # round 0 warms up (first touch at the dest)
            progress(f"{spec.label}: round {round_index}/{rounds}")
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                seconds, moved = runs[name]()
                if round_index:
                    samples[name].append((seconds, moved))
    finally:
        if saved_fd >= 0:
            os.close(saved_fd)
        if buffer is not None:
            with contextlib.suppress(BufferError):
                buffer.close()
        for vmm in (dest, source, old_dest, old_source):
            if vmm is not None:
                vmm.close()
    return {
        "guest": spec.label,
        "size": spec.size,
        "rows": rows,
        "samples": {name: [list(sample) for sample in found] for name, found in samples.items()},
    }


def report(result: dict[str, Any], rounds: int) -> dict[str, float]:
    rates = {
        name: median([gbps(moved, seconds) for seconds, moved in rows])
        for name, rows in result["samples"].items()
    }
    moved = {name: median([m for _, m in rows]) for name, rows in result["samples"].items()}
    say(f"**{result['guest']}** (GB/s of bytes on the socket, median of {rounds}):")
    say()
    rows = [
        [
            label,
            f"{rates[name]:.2f}",
            f"{moved[name] / MIB:,.0f} MiB",
            ratio(rates[name], rates["plain"]),
        ]
        for name, label in result["rows"].items()
    ]
    say(table(["path", "GB/s", "bytes", "÷ plain copy"], rows))
    say()
    return rates


# --- a busy guest migrated with the default policy -----------------------------------------

#: the issue's busy guest: one vCPU rewriting a 32 MiB working set flat out
BUSY = GuestSpec(512 * MIB, 1, "32M")


def migrate_busy(runs: int, tmp: str) -> list[dict[str, Any]]:
    """``vmipc.sequences.migrate_blocking`` (the default MigrationPolicy) of BUSY between
    two VMM processes, ``runs`` times: its report, or the one it gave up with."""
    results = []
    for run in range(runs):
        progress(f"migrating {BUSY.label} rate=0 ({run + 1}/{runs})")
        source = dest = None
        try:
            source = Vmm(BUSY, tmp, f"busy-src{run}", incoming=False, pause=False)
            dest = Vmm(BUSY, tmp, f"busy-dst{run}", incoming=True)
            assert source.client is not None
            source.client.close()  # the migration's own clients only
            source.client = None
            try:
                report: MigrationReport = migrate_blocking(source.socket_path, dest.socket_path)
            except MigrationNotConverged as exc:
                report = exc.report
            rounds = report.round_details
            last = rounds[-1] if rounds else None
            results.append(
                {
                    "converged": report.converged and report.outcome == "migrated",
                    "outcome": report.outcome,
                    "downtime_s": report.downtime_s,
                    "total_s": report.total_s,
                    "rounds": report.rounds,
                    "last_round": None
                    if last is None
                    else {"kind": last.kind, "bytes": last.bytes, "seconds": last.seconds},
                    "dirty_rounds": [
                        {"bytes": r.bytes, "seconds": r.seconds}
                        for r in rounds
                        if r.kind == "dirty" and r.seconds > 0
                    ],
                    "reason": report.reason,
                }
            )
        finally:
            for vmm in (dest, source):
                if vmm is not None:
                    with contextlib.suppress(Exception):
                        vmm.close()
    return results


def report_migrations(runs: list[dict[str, Any]], plain_gbps: float) -> None:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value * 1e3:.1f} ms"

    converged = [run for run in runs if run["converged"]]
    finals = [run["last_round"] for run in converged if run["last_round"]]
    final_rate = median([gbps(f["bytes"], f["seconds"]) for f in finals]) if finals else None
    dirty = [r for run in runs for r in run["dirty_rounds"]]
    dirty_rate = median([gbps(r["bytes"], r["seconds"]) for r in dirty]) if dirty else None
    say(
        f"**{BUSY.label} rate=0, migrated with the default MigrationPolicy** "
        f"(medians of the {len(converged)} of {len(runs)} runs that converged):"
    )
    say()
    rows = [
        ["converged", f"{len(converged)} of {len(runs)}"],
        [
            "downtime (own report)",
            ms(median([r["downtime_s"] for r in converged]) if converged else None),
        ],
        ["total", ms(median([r["total_s"] for r in converged]) if converged else None)],
        ["rounds", f"{median([r['rounds'] for r in converged]):.0f}" if converged else "—"],
        [
            "last round (in the pause): bytes, time",
            f"{median([f['bytes'] for f in finals]) / MIB:.1f} MiB, "
            f"{ms(median([f['seconds'] for f in finals]))}"
            if finals
            else "—",
        ],
        [
            "last round GB/s ÷ plain copy",
            "—" if final_rate is None else f"{final_rate:.2f} ({ratio(final_rate, plain_gbps)})",
        ],
        [
            "dirty rounds GB/s ÷ plain copy",
            "—" if dirty_rate is None else f"{dirty_rate:.2f} ({ratio(dirty_rate, plain_gbps)})",
        ],
    ]
    say(table(["measure", "value"], rows))
    say()
    reasons = [run["reason"] for run in runs if not run["converged"]]
    if reasons:
        say_notes([f"gave up: {reason}" for reason in reasons])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 512 MiB guest, 3 rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the raw samples here")
    parser.add_argument("--rounds", type=int, help="measured rounds (default 5, --quick 3)")
    parser.add_argument(
        "--migrations", type=int, help="busy-guest migrations (default 5, --quick 3; 0: none)"
    )
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also run the stream and sender-alone rows with the vmipc of another tree's "
        "src/ (e.g. a `git archive` of an earlier commit), interleaved with this tree's",
    )
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_dataplane: /dev/kvm is not usable here; nothing to measure", file=sys.stderr)
        return 1
    spec = GuestSpec(512 * MIB, 1, "460M") if args.quick else GuestSpec(GIB, 2, "460M")
    rounds = args.rounds or (3 if args.quick else 5)
    began = time.perf_counter()
    say(f"# vmipc VMM-to-VMM page throughput ({'quick' if args.quick else 'full'} run)")
    say()
    say(
        f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * PAGE_SIZE / GIB:.0f} GiB, "
        f"Python {sys.version.split()[0]}, Linux {os.uname().release}; 1-minute load "
        f"average {os.getloadavg()[0]:.1f} at the start"
    )
    say()
    tmp = tempfile.mkdtemp(prefix="vmipc-bench-dataplane-")
    migrations = args.migrations if args.migrations is not None else (3 if args.quick else 5)
    try:
        result = bench(spec, rounds, tmp, args.baseline_src)
        result["rates_gbps"] = report(result, rounds)
        result["migrations"] = migrate_busy(migrations, tmp) if migrations else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result["migrations"]:
        report_migrations(result["migrations"], result["rates_gbps"]["plain"])
    result["elapsed_s"] = time.perf_counter() - began
    say_notes(
        [
            "each row moves the bytes through a fresh AF_UNIX socket pair; VMM rows are timed "
            "from before both requests to after both replies (the round trips included)",
            f"1-minute load average {os.getloadavg()[0]:.1f} at the end: other jobs share "
            "the machine, compare the ratios",
        ]
    )
    say(f"Total benchmark time: {result['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
