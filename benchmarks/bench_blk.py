#!/usr/bin/env python3
"""Block I/O seen from the guest: IOPS and throughput of vmipc's virtio-blk device beside
QEMU 7.2's, the same guest doing the same I/O on the same image.

The guest is the built-in one (``src/vmipc/guest/builtin.elf``) with ``disk=3``, its I/O
benchmark (guest/README.md): vCPU 0 runs four tests one after the other, each for
``benchms`` milliseconds of guest time after a tenth of that as a warm-up, keeping
``depth`` requests in flight (1 or 16), and prints one line per test with the requests it
counted and the nanoseconds they took by its own clock (kvmclock under both VMMs):

* ``randread`` / ``randwrite``: 4 KiB at random 4 KiB-aligned offsets over the span;
* ``seqread`` / ``seqwrite``: 64 KiB in order over the span, wrapping.

The guest polls the used ring in memory (no interrupt, no register read per poll), so
what is measured is the time from the notify to the used entry, the same way for both.
Timing in the guest rather than from host timestamps of console lines keeps the console
out of it (a console line costs milliseconds here).

* **vmipc**: ``vmipc vmm --disk IMAGE`` (sandboxed, its worker thread runs each request
  with preadv/pwrite on the image fd).
* **QEMU**: ``-M microvm -accel kvm``, the image as ``-drive format=raw,cache=writeback,
  aio=threads`` on a ``virtio-blk-device`` (virtio-mmio, ``force-legacy=false`` so that it
  is virtio 1.x like ours). QEMU's ``-kernel`` boots the multiboot guest on microvm (its
  SeaBIOS runs the multiboot option ROM); microvm puts the transports at 0xfeb00000 with a
  512-byte stride (24 of them in 7.2, the device on the last one), so the guest is told
  ``mmio=0xfeb00000 mmios=24`` and probes for the block device.

Both read and write the host's page cache (the image is written, then synced, before the
first boot; nobody flushes during the tests). Each boot runs all four tests at one depth;
the boots alternate vmipc, QEMU, vmipc, ... and the tables give medians over them and the
ratio vmipc/QEMU in the same run.

Run: ``.venv/bin/python benchmarks/bench_blk.py [--quick] [--json FILE] [--no-qemu]``
(about 40 s; ``--quick`` about 10 s). Needs /dev/kvm (as root). Every VMM and QEMU it
starts is killed by its pid on every path; the image lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import progress, qemu_or_note, ratio, say, say_notes, table, write_json

from vmipc.guest import BUILTIN_GUEST_PATH

MIB = 1 << 20
MEMORY_MIB = 64
#: the span the tests cover: 4 KiB blocks (64 MiB)
BLOCKS = 16384
SEQ_BS = 64 << 10
DEPTHS = (1, 16)
TESTS = ("randread", "randwrite", "seqread", "seqwrite")
MICROVM_MMIO = 0xFEB00000
MICROVM_TRANSPORTS = 24
BOOT_TIMEOUT = 120.0
LINE = re.compile(
    rb"vcpu=0 disk bench=(\w+) bs=(\d+) depth=(\d+) ops=(\d+) ns=(\d+) iops=\d+ kib_s=\d+"
)


def guest_options(depth: int, benchms: int) -> list[str]:
    return [
        "disk=3",
        f"depth={depth}",
        f"blocks={BLOCKS}",
        f"benchms={benchms}",
        f"seqbs={SEQ_BS}",
        "ws=1M",  # the buffers: depth x seqbs in vCPU 0's working set
    ]


@contextlib.contextmanager
def started(argv: Sequence[str], stdout: Any, stderr: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is killed (by its pid) and reaped on every path."""
    with stderr.open("wb") as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=err)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def parse(output: bytes, what: str) -> dict[str, tuple[int, int, int]]:
    """test -> (bytes per request, requests, ns) from the guest's lines."""
    if b"ERROR" in output:
        line = next(x for x in output.splitlines() if b"ERROR" in x)
        raise RuntimeError(f"{what}: the guest said {line.decode(errors='replace')[:200]}")
    found = {}
    for m in LINE.finditer(output):
        found[m.group(1).decode()] = (int(m.group(2)), int(m.group(4)), int(m.group(5)))
    if set(found) != set(TESTS):
        tail = output[-300:].decode(errors="replace")
        raise RuntimeError(f"{what}: the guest printed {sorted(found)} of {TESTS}: {tail!r}")
    return found


def wait_done(proc: subprocess.Popen[bytes], read: Any, what: str, stderr: Path) -> bytes:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        out: bytes = read()
        if b"vcpu=0 done" in out or b"ERROR" in out:
            return out
        if proc.poll() is not None:
            out = read()
            if b"vcpu=0 done" in out:
                return out
            why = stderr.read_bytes()[-400:].decode(errors="replace")
            raise RuntimeError(f"{what} exited {proc.returncode} before the guest was done: {why}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: the guest not done within {BOOT_TIMEOUT:.0f} s")
        time.sleep(0.05)


def run_vmipc(tmp: Path, image: Path, depth: int, benchms: int) -> dict[str, tuple[int, int, int]]:
    console = tmp / "vmipc.console"
    console.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "vmipc", "vmm", "--memory", f"{MEMORY_MIB}M"]
    argv += ["--disk", str(image), "--console", str(console), "--no-console-input"]
    for option in guest_options(depth, benchms):
        argv += ["--guest-opt", option]
    stderr = tmp / "vmipc.stderr"
    with started(argv, subprocess.DEVNULL, stderr) as proc:
        out = wait_done(
            proc,
            lambda: console.read_bytes() if console.exists() else b"",
            "vmipc",
            stderr,
        )
    return parse(out, "vmipc")


def qemu_argv(qemu: str, image: Path, serial: Path, depth: int, benchms: int) -> list[str]:
    options = [*guest_options(depth, benchms), f"mmio={MICROVM_MMIO:#x}"]
    options.append(f"mmios={MICROVM_TRANSPORTS}")
    argv = [qemu, "-M", "microvm", "-accel", "kvm", "-m", str(MEMORY_MIB), "-smp", "1"]
    argv += ["-kernel", str(BUILTIN_GUEST_PATH), "-append", " ".join(["vcpus=1", *options])]
    argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{serial}"]
    argv += ["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"]
    argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += ["-drive", f"id=d0,file={image},format=raw,if=none,cache=writeback,aio=threads"]
    argv += ["-device", "virtio-blk-device,drive=d0"]
    return argv


def run_qemu(
    qemu: str, tmp: Path, image: Path, depth: int, benchms: int
) -> dict[str, tuple[int, int, int]]:
    serial = tmp / "qemu.serial"
    serial.unlink(missing_ok=True)
    stderr = tmp / "qemu.stderr"
    argv = qemu_argv(qemu, image, serial, depth, benchms)
    with started(argv, subprocess.DEVNULL, stderr) as proc:
        out = wait_done(
            proc, lambda: serial.read_bytes() if serial.exists() else b"", "QEMU", stderr
        )
    return parse(out, "QEMU")


def make_image(path: Path) -> None:
    """Data everywhere (no holes: both VMMs read real page-cache pages), synced."""
    chunk = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(BLOCKS * 4096 // MIB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def summarize(samples: list[dict[str, tuple[int, int, int]]]) -> dict[str, dict[str, float]]:
    """test -> median IOPS and MiB/s over the boots."""
    out = {}
    for test in TESTS:
        iops = [s[test][1] * 1e9 / s[test][2] for s in samples]
        mibs = [s[test][0] * s[test][1] * 1e9 / s[test][2] / MIB for s in samples]
        out[test] = {"iops": statistics.median(iops), "mib_s": statistics.median(mibs)}
    return out


def report(results: dict[str, dict[int, list[dict[str, tuple[int, int, int]]]]]) -> None:
    for depth in DEPTHS:
        ours = summarize(results["vmipc"][depth])
        theirs = summarize(results["qemu"][depth]) if "qemu" in results else None
        boots = len(results["vmipc"][depth])
        say(f"### Queue depth {depth} (medians of {boots} boots each)")
        say()
        rows = []
        for test in TESTS:
            bs = results["vmipc"][depth][0][test][0]
            v = ours[test]
            q = theirs[test] if theirs else None
            rows.append(
                [
                    f"{test} {bs // 1024} KiB",
                    f"{v['iops']:.0f}",
                    f"{v['mib_s']:.1f}",
                    f"{q['iops']:.0f}" if q else "—",
                    f"{q['mib_s']:.1f}" if q else "—",
                    ratio(v["iops"], q["iops"] if q else None),
                ]
            )
        headers = ["test", "vmipc IOPS", "vmipc MiB/s", "QEMU IOPS", "QEMU MiB/s", "vmipc/QEMU"]
        say(table(headers, rows))
        say()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one boot each, 200 ms tests")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU columns")
    parser.add_argument("--json", metavar="FILE", help="also write every boot's figures")
    parser.add_argument("--boots", type=int, help="boots per VMM and depth (default 3, quick 1)")
    args = parser.parse_args(argv)
    boots = args.boots or (1 if args.quick else 3)
    benchms = 200 if args.quick else 500
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_blk: needs a usable /dev/kvm", file=sys.stderr)
        return 3
    notes = [
        f"{os.cpu_count()} CPUs; 1 vCPU, {MEMORY_MIB} MiB; a {BLOCKS * 4096 // MIB} MiB raw "
        "image of random data in a temporary directory, in the page cache for both.",
        f"each test {benchms} ms of guest time (kvmclock) after a {benchms // 10} ms warm-up; "
        "IOPS = requests completed / time; MiB/s = IOPS x request size.",
        "QEMU: -M microvm, virtio-blk-device on virtio-mmio (virtio 1.x), cache=writeback, "
        "aio=threads; the guest finds the device by probing microvm's transports.",
    ]
    qemu = qemu_or_note(args.no_qemu, notes)
    results: dict[str, dict[int, list[dict[str, tuple[int, int, int]]]]] = {"vmipc": {}}
    with tempfile.TemporaryDirectory(prefix="vmipc-bench-blk-") as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "disk.img"
        progress(f"writing a {BLOCKS * 4096 // MIB} MiB image")
        make_image(image)
        for depth in DEPTHS:
            for boot in range(boots):
                progress(f"depth {depth}, boot {boot + 1}/{boots}: vmipc")
                results["vmipc"].setdefault(depth, []).append(run_vmipc(tmp, image, depth, benchms))
                if qemu is not None:
                    progress(f"depth {depth}, boot {boot + 1}/{boots}: QEMU")
                    try:
                        got = run_qemu(qemu, tmp, image, depth, benchms)
                    except RuntimeError as exc:
                        notes.append(f"QEMU columns skipped: {exc}")
                        qemu = None
                        results.pop("qemu", None)
                        continue
                    results.setdefault("qemu", {}).setdefault(depth, []).append(got)
    report(results)
    say_notes(notes)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
