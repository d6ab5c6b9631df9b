#!/usr/bin/env python3
"""Round-trip latency of the control protocol: query-status, pause and resume.

Prints Markdown tables of p50/p99 round trips, one client and 16 concurrent clients, for

* **vmipc**: ``vmipc vmm --socket`` (its own process) running the built-in guest, driven
  by the blocking client (``SyncClient``) -- query-status, pause, resume;
* **floor**: a plain trio echo server over the same kind of socket (AF_UNIX stream, its own
  process), answering frames of the same sizes as query-status -- what any trio server
  with one request in flight costs here;
* **QMP**: QEMU (Debian's ``qemu-system-x86_64``, ``-accel kvm``) booting the same built-in
  guest image, driven over QMP sockets -- query-status, stop, cont.

Then pause with requests in flight (one client): pause/resume round trips of the built-in
guest running its disk workload with 16 requests in flight (``disk=1 depth=16``), beside
the same guest without a disk, under vmipc and QEMU ``-M microvm`` with a
``virtio-blk-device``; and vmipc's ``pause`` + ``flush-devices`` (QEMU's ``stop`` drains
and flushes). ``--only-disk`` runs only that part, ``--no-disk`` skips it.

All three run in the same invocation, so a noisy machine affects them alike; compare the
ratios. With 16 clients, query-status is sent by all of them at once; pause/resume is sent
by one client while the 15 others keep sending query-status (pausing 16 times at once is
not a meaningful operation), and the table shows both sides.

Run: ``.venv/bin/python benchmarks/bench_control_latency.py [--quick] [--json FILE]
[--no-qemu] [--rounds N] [--baseline OTHER_CHECKOUT/src]`` (about 20 s; ``--quick`` about
10 s; the samples are split over the rounds). ``--baseline`` adds the columns of a VMM run
from another source tree, measured in the same rounds: a before/after in one run. It
needs /dev/kvm. QEMU is installed with ``tools/install-system-deps`` when missing; its
columns are skipped, with a note, when it still cannot boot the guest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from _common import percentile, progress, qemu_or_note, ratio, table, us

CLIENTS = 16
BANNER = b"vmipc-guest "


# --- the three kinds of client: one operation = one timed round trip ------------------------

Op = Callable[[], None]


class VmipcClient:
    def __init__(self, path: str) -> None:
        from vmipc.client import SyncClient

        self.client = SyncClient(path, timeout=30)

    def op(self, name: str) -> Op:
        call = self.client.call
        return lambda: call(name)

    def close(self) -> None:
        self.client.close()


class EchoClient:
    """Frames of the same sizes as a query-status request and its result."""

    REQUEST = (39).to_bytes(4, "big") + b"q" * 39

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def op(self, name: str) -> Op:
        sock = self.sock
        request = self.REQUEST

        def echo() -> None:
            sock.sendall(request)
            need = 85
            while need:
                need -= len(sock.recv(need))

        return echo

    def close(self) -> None:
        self.sock.close()


class QmpClient:
    COMMANDS: ClassVar[dict[str, str]] = {
        "query-status": "query-status",
        "pause": "stop",
        "resume": "cont",
    }

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self._read_reply()  # the greeting
        self._execute("qmp_capabilities")

    def _read_reply(self) -> dict[str, Any]:
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("QMP closed the connection")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def _execute(self, command: str) -> None:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = self._read_reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")

    def op(self, name: str) -> Op:
        command = self.COMMANDS[name]
        return lambda: self._execute(command)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


CLIENT_KINDS: dict[str, type[VmipcClient] | type[EchoClient] | type[QmpClient]] = {
    "vmipc": VmipcClient,
    "echo": EchoClient,
    "qmp": QmpClient,
}


def timed(op: Op, count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        op()
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        op()
        samples.append(clock() - start)
    return samples


def pause_resume(client: Any, cycles: int, warmup: int) -> tuple[list[float], list[float]]:
    pause, resume = client.op("pause"), client.op("resume")
    clock = time.perf_counter
    pauses: list[float] = []
    resumes: list[float] = []
    for i in range(warmup + cycles):
        time.sleep(0.001)  # let the guest run a moment between cycles
        start = clock()
        pause()
        mid = clock()
        resume()
        end = clock()
        if i >= warmup:
            pauses.append(mid - start)
            resumes.append(end - mid)
    return pauses, resumes


def worker(
    kind: str, path: str, job: str, count: int, warmup: int, start_at: float, results: Any
) -> None:
    """One concurrent client (a process of its own): ``job`` is "status" or "pause-resume"."""
    try:
        client = CLIENT_KINDS[kind](path)
        try:
            time.sleep(max(0.0, start_at - time.time()))
            if job == "status":
                out: dict[str, list[float]] = {
                    "status": timed(client.op("query-status"), count, warmup)
                }
            else:
                pauses, resumes = pause_resume(client, count, warmup)
                out = {"pause": pauses, "resume": resumes}
        finally:
            client.close()
        results.put(out)
    except BaseException as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def concurrent(
    kind: str, paths: Sequence[str], jobs: Sequence[str], count: int, warmup: int
) -> dict[str, list[float]]:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 0.5 + 0.02 * len(jobs)  # every process connected by then
    procs = [
        ctx.Process(
            target=worker, args=(kind, paths[i % len(paths)], job, count, warmup, start_at, results)
        )
        for i, job in enumerate(jobs)
    ]
    for p in procs:
        p.start()
    merged: dict[str, list[float]] = {}
    for _ in procs:
        got = results.get(timeout=300)
        if "error" in got:
            raise RuntimeError(f"{kind} client failed: {got['error']}")
        for key, samples in got.items():
            merged.setdefault(key, []).extend(samples)
    for p in procs:
        p.join(30)
    return merged


# --- the servers --------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.02)


@contextmanager
def vmipc_vmm(tmp: str, src: str | None = None, extra: Sequence[str] = ()) -> Iterator[str]:
    """``vmipc vmm`` with the built-in guest; ``src``: the source tree to run it from (a
    baseline checkout's ``src``), else this one; ``extra``: more arguments (a disk)."""
    path = os.path.join(tmp, "vmipc.sock")
    console = Path(tmp) / "vmipc-console.txt"
    if console.exists():
        console.unlink()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    argv = [sys.executable, "-m", "vmipc", "vmm", "--guest", "builtin", "--vcpus", "1"]
    argv += ["--memory", "64M", "--console", str(console), "--no-console-input"]
    argv += ["--socket", path, *extra]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(
            lambda: console.exists() and BANNER in console.read_bytes(),
            "the vmipc VMM did not boot the guest",
            30,
        )
        yield path
    finally:
        if proc.poll() is None:
            try:
                from vmipc.client import SyncClient

                with SyncClient(path, timeout=10) as client:
                    client.quit()
            except Exception:
                proc.kill()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()


ECHO_SERVER = """
import sys, trio
async def main(path):
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(64)
    reply = (81).to_bytes(4, "big") + b"r" * 81
    async def handle(sock):
        with sock:
            buf = b""
            while True:
                data = await sock.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    buf = buf[4 + int.from_bytes(buf[:4], "big"):]
                    await sock.send(reply)
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(handle, sock)
trio.run(main, sys.argv[1])
"""


@contextmanager
def echo_server(tmp: str) -> Iterator[str]:
    path = os.path.join(tmp, "echo.sock")
    if os.path.exists(path):  # the last round's
        os.unlink(path)
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, path])
    try:
        wait_for(lambda: os.path.exists(path), "the echo server did not start", 10)
        yield path
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@contextmanager
def qemu_vm(
    qemu: str, tmp: str, sockets: int, extra: Sequence[str] = (), append: str = ""
) -> Iterator[list[str]]:
    """QEMU + KVM booting the built-in guest, with ``sockets`` QMP sockets (one per client:
    a QMP socket serves one client at a time). Retried: SeaBIOS now and then hangs here.
    ``extra``: more arguments (a machine type, a disk); ``append``: more guest options."""
    from vmipc.guest import BUILTIN_GUEST_PATH

    paths = [os.path.join(tmp, f"qmp{i}.sock") for i in range(sockets)]
    last = ""
    for attempt in range(3):
        serial = Path(tmp) / f"qemu-serial-{attempt}.txt"
        if serial.exists():  # the last round's
            serial.unlink()
        argv = [qemu, "-accel", "kvm", "-smp", "1", "-m", "64"]
        argv += ["-kernel", str(BUILTIN_GUEST_PATH), "-append", f"vcpus=1 {append}".strip()]
        argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{serial}"]
        argv += ["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"]
        for path in paths:
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
        argv += list(extra)
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            try:
                wait_for(
                    lambda s=serial: s.exists() and BANNER in s.read_bytes(),  # type: ignore[misc]
                    "QEMU did not boot the guest",
                    60,
                )
            except TimeoutError as exc:
                last = str(exc)
                progress(f"QEMU attempt {attempt + 1}: {last}")
                continue
            yield paths
            return
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
            for path in paths:
                if os.path.exists(path):
                    os.unlink(path)
    raise RuntimeError(f"QEMU failed 3 times: {last}")


# --- pause with requests in flight ----------------------------------------------------------

#: the disk workload (guest/README.md): vCPU 0 writes 256 blocks, flushes, reads them back,
#: pass after pass, 16 requests in flight; a pass line each pass shows it kept going
DISK_OPTIONS = ("disk=1", "depth=16", "blocks=256", "every=1")
DISK_MIB = 8
#: QEMU microvm's virtio-mmio transports (see benchmarks/bench_blk.py)
MICROVM = ["-M", "microvm", "-global", "virtio-mmio.force-legacy=false"]
MICROVM_GUEST = "mmio=0xfeb00000 mmios=24"


def pause_flush(client: VmipcClient, cycles: int, warmup: int) -> list[float]:
    """pause then flush-devices (what QEMU's stop does: drain, then flush), then resume:
    the pause and flush round trips together."""
    pause, flush, resume = client.op("pause"), client.op("flush-devices"), client.op("resume")
    clock = time.perf_counter
    samples = []
    for i in range(warmup + cycles):
        time.sleep(0.001)
        start = clock()
        pause()
        flush()
        end = clock()
        resume()
        if i >= warmup:
            samples.append(end - start)
    return samples


def disk_running(console: Path, after: int, what: str) -> int:
    """Wait until the guest printed more than ``after`` disk pass lines; their number."""
    wait_for(lambda: disk_passes(console) > after, f"{what}: no disk pass line", 30)
    return disk_passes(console)


def disk_passes(console: Path) -> int:
    """How many disk pass lines the guest printed; RuntimeError on an error line."""
    text = console.read_bytes() if console.exists() else b""
    if b"ERROR" in text:
        line = next(x for x in text.splitlines() if b"ERROR" in x)
        raise RuntimeError(f"the guest said {line.decode(errors='replace')[:200]}")
    return text.count(b"vcpu=0 disk pass=")


def measure_drain(
    tmp: str, qemu: str | None, cycles: int, notes: list[str]
) -> dict[str, dict[str, list[float]]]:
    """Pause/resume round trips (one client) of the same guest with its disk workload at
    depth 16 and without a disk, under vmipc and (microvm) QEMU."""
    image = Path(tmp) / "drain.img"
    with image.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    out: dict[str, dict[str, list[float]]] = {}
    disk_args = ["--disk", str(image)]
    for option in DISK_OPTIONS:
        disk_args += ["--guest-opt", option]
    console = Path(tmp) / "vmipc-console.txt"
    for name, extra in (("vmipc", []), ("vmipc+disk", disk_args)):
        progress(f"pause with requests in flight: {name}")
        with vmipc_vmm(tmp, extra=extra) as path:
            before = disk_running(console, 0, name) if extra else 0
            client = VmipcClient(path)
            flushes: list[float] = []
            try:
                pauses, resumes = pause_resume(client, cycles, cycles // 10)
                if extra:
                    flushes = pause_flush(client, cycles, cycles // 10)
            finally:
                client.close()
            if extra:  # it went on: the pauses fell on a working disk workload
                disk_running(console, before, name)
        out[name] = {"pause": pauses, "resume": resumes}
        if flushes:
            out[name]["pause+flush"] = flushes
    if qemu is None:
        return out
    drive = f"id=d0,file={image},format=raw,if=none,cache=writeback,aio=threads"
    qemu_disk = [*MICROVM, "-drive", drive, "-device", "virtio-blk-device,drive=d0"]
    for name, extra, append in (
        ("qmp", MICROVM, ""),
        ("qmp+disk", qemu_disk, f"{' '.join(DISK_OPTIONS)} {MICROVM_GUEST}"),
    ):
        progress(f"pause with requests in flight: {name}")
        try:
            with qemu_vm(qemu, tmp, 1, extra, append) as paths:
                serial = max(Path(tmp).glob("qemu-serial-*.txt"), key=lambda p: p.stat().st_mtime)
                before = disk_running(serial, 0, name) if append else 0
                client = QmpClient(paths[0])
                try:
                    pauses, resumes = pause_resume(client, cycles, cycles // 10)
                finally:
                    client.close()
                if append:
                    disk_running(serial, before, name)
        except (RuntimeError, OSError, ConnectionError, TimeoutError) as exc:
            notes.append(f"QEMU drain columns skipped: {exc}.")
            return out
        out[name] = {"pause": pauses, "resume": resumes}
    return out


def report_drain(drain: dict[str, dict[str, list[float]]]) -> None:
    print("\n### Pause with 16 requests in flight (one client)\n")
    rows = []
    for vmm, label in (("vmipc", "vmipc `pause`"), ("qmp", "QMP `stop`")):
        if vmm not in drain:
            continue
        idle50, idle99 = stats(drain[vmm]["pause"])
        busy50, busy99 = stats(drain.get(f"{vmm}+disk", {}).get("pause"))
        rbusy, _ = stats(drain.get(f"{vmm}+disk", {}).get("resume"))
        ridle, _ = stats(drain[vmm]["resume"])
        rows.append(
            [
                label,
                us(idle50),
                us(idle99),
                us(busy50),
                us(busy99),
                ratio(busy50, idle50),
                us(ridle),
                us(rbusy),
            ]
        )
    headers = ["pause", "no disk p50", "no disk p99", "disk busy p50", "disk busy p99"]
    headers += ["busy/no disk p50", "resume p50 no disk", "resume p50 disk busy"]
    print(table(headers, rows))
    if "vmipc+disk" in drain and "qmp+disk" in drain:
        v50, _ = stats(drain["vmipc+disk"]["pause"])
        q50, _ = stats(drain["qmp+disk"]["pause"])
        print(f"\nvmipc/QMP pause p50 with the disk busy: {ratio(v50, q50)}.")
    flushes = drain.get("vmipc+disk", {}).get("pause+flush")
    if flushes:
        f50, f99 = stats(flushes)
        q50, _ = stats(drain.get("qmp+disk", {}).get("pause"))
        print(
            f"vmipc `pause` + `flush-devices` with the disk busy (QEMU's stop drains and "
            f"flushes): p50 {us(f50)}, p99 {us(f99)}; vmipc/QMP p50 {ratio(f50, q50)}."
        )


# --- the benchmark ------------------------------------------------------------------------


def measure(kind: str, paths: Sequence[str], n: int, cycles: int) -> dict[str, Any]:
    """One client, then 16 concurrent clients, against one server."""
    progress(f"{kind}: one client")
    client = CLIENT_KINDS[kind](paths[0])
    try:
        one: dict[str, list[float]] = {"status": timed(client.op("query-status"), n, n // 10)}
        if kind != "echo":
            one["pause"], one["resume"] = pause_resume(client, cycles, cycles // 10)
    finally:
        client.close()
    progress(f"{kind}: {CLIENTS} concurrent clients")
    many = {"status": concurrent(kind, paths, ["status"] * CLIENTS, n // 4, n // 40)["status"]}
    if kind != "echo":
        mixed = concurrent(
            kind, paths, ["pause-resume"] + ["status"] * (CLIENTS - 1), cycles, cycles // 10
        )
        many["pause"], many["resume"] = mixed["pause"], mixed["resume"]
        many["status_beside_pauses"] = mixed["status"]
    return {"one": one, "many": many}


def stats(samples: list[float] | None) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    return statistics.median(samples), percentile(samples, 99)


def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for scope, samples in more.items():
        for key, values in samples.items():
            into.setdefault(scope, {}).setdefault(key, []).extend(values)


def report(results: dict[str, dict[str, Any]], notes: list[str]) -> None:
    names = {
        "status": ("query-status", "query-status"),
        "pause": ("pause", "stop"),
        "resume": ("resume", "cont"),
    }
    base = "base" in results
    for scope, title in (("one", "one client"), ("many", f"{CLIENTS} concurrent clients")):
        print(f"\n### Round trip, {title}\n")
        rows = []
        keys = [(key, f"`{ours}` / QMP `{theirs}`") for key, (ours, theirs) in names.items()]
        if scope == "many":
            keys.append(("status_beside_pauses", "query-status by the 15 others meanwhile"))
        for key, label in keys:
            v50, v99 = stats(results["vmipc"][scope].get(key))
            q50, q99 = stats(results.get("qmp", {}).get(scope, {}).get(key))
            row = [label, us(v50), us(v99), us(q50), us(q99), ratio(v50, q50)]
            if base:
                b50, _ = stats(results["base"][scope].get(key))
                row += [us(b50), ratio(b50, q50)]
            rows.append(row)
        e50, e99 = stats(results["echo"][scope]["status"])
        floor = ["floor: trio echo, same socket and frame sizes", us(e50), us(e99), "", "", ""]
        rows.append(floor + (["", ""] if base else []))
        headers = ["operation", "vmipc p50", "vmipc p99", "QMP p50", "QMP p99", "vmipc/QMP p50"]
        if base:
            headers += ["baseline p50", "baseline/QMP p50"]
        print(table(headers, rows))
        v50, _ = stats(results["vmipc"][scope]["status"])
        print(f"\nquery-status costs {ratio(v50, e50)} the echo floor ({title}).")
    if notes:
        print("\nNotes:")
        for note in notes:
            print(f"- {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (~10 s)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QMP columns")
    parser.add_argument("--json", metavar="FILE", help="also write the raw samples (seconds)")
    parser.add_argument("--no-disk", action="store_true", help="skip pause with requests in flight")
    parser.add_argument(
        "--only-disk", action="store_true", help="only pause with requests in flight"
    )
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also measure a vmipc VMM run from this source tree (another checkout's src/), "
        "in the same rounds",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every server this many times, in turn, and pool the samples (on a "
        "noisy host, so that load spikes fall on all of them alike)",
    )
    args = parser.parse_args(argv)
    n, cycles = (400, 100) if args.quick else (2000, 400)
    rounds = max(1, args.rounds)
    n, cycles = max(40, n // rounds), max(20, cycles // rounds)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_control_latency: needs a usable /dev/kvm", file=sys.stderr)
        return 3
    notes: list[str] = [
        f"{os.cpu_count()} CPUs; the guest has 1 vCPU busy in ring 3 under both VMMs; "
        "each client is a process of its own using a blocking socket.",
        "vmipc pause returns when every vCPU is parked outside KVM_RUN; QMP stop when "
        "QEMU has paused its vCPUs (vm_stop).",
    ]
    results: dict[str, dict[str, Any]] = {}
    qemu = qemu_or_note(args.no_qemu, notes, "QMP columns")
    if args.baseline:
        notes.append(f"baseline: a vmipc VMM run from {args.baseline}.")
    if rounds > 1:
        notes.append(f"{rounds} rounds, each server measured once per round, samples pooled.")
    drain: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vmipc-bench-") as tmp:
        for _ in range(0 if args.only_disk else rounds):
            with echo_server(tmp) as path:
                merge(results.setdefault("echo", {}), measure("echo", [path], n, cycles))
            with vmipc_vmm(tmp) as path:
                merge(results.setdefault("vmipc", {}), measure("vmipc", [path], n, cycles))
            if args.baseline:
                with vmipc_vmm(tmp, args.baseline) as path:
                    merge(results.setdefault("base", {}), measure("vmipc", [path], n, cycles))
            if qemu is not None:
                try:
                    with qemu_vm(qemu, tmp, CLIENTS) as paths:
                        merge(results.setdefault("qmp", {}), measure("qmp", paths, n, cycles))
                except (RuntimeError, OSError, ConnectionError) as exc:
                    notes.append(f"QMP columns skipped: {exc}.")
                    qemu = None
                    results.pop("qmp", None)
        if not args.no_disk:
            drain = measure_drain(tmp, qemu, cycles * rounds, notes)
    if not args.only_disk:
        report(results, notes)
    if drain:
        report_drain(drain)
        if args.only_disk and notes:
            print("\nNotes:")
            for note in notes:
                print(f"- {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "drain": drain}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
