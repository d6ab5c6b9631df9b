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

from _common import find_qemu, percentile, progress, ratio, table, us

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
def vmipc_vmm(tmp: str, src: str | None = None) -> Iterator[str]:
    """``vmipc vmm`` with the built-in guest; ``src``: the source tree to run it from (a
    baseline checkout's ``src``), else this one."""
    path = os.path.join(tmp, "vmipc.sock")
    console = Path(tmp) / "vmipc-console.txt"
    if console.exists():
        console.unlink()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    argv = [sys.executable, "-m", "vmipc", "vmm", "--guest", "builtin", "--vcpus", "1"]
    argv += ["--memory", "64M", "--console", str(console), "--no-console-input"]
    argv += ["--socket", path]
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
def qemu_vm(qemu: str, tmp: str, sockets: int) -> Iterator[list[str]]:
    """QEMU + KVM booting the built-in guest, with ``sockets`` QMP sockets (one per client:
    a QMP socket serves one client at a time). Retried: SeaBIOS now and then hangs here."""
    from vmipc.guest import BUILTIN_GUEST_PATH

    paths = [os.path.join(tmp, f"qmp{i}.sock") for i in range(sockets)]
    last = ""
    for attempt in range(3):
        serial = Path(tmp) / f"qemu-serial-{attempt}.txt"
        if serial.exists():  # the last round's
            serial.unlink()
        argv = [qemu, "-accel", "kvm", "-smp", "1", "-m", "64"]
        argv += ["-kernel", str(BUILTIN_GUEST_PATH), "-append", "vcpus=1"]
        argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{serial}"]
        argv += ["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-no-reboot"]
        for path in paths:
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
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
    qemu: str | None = None
    if args.no_qemu:
        notes.append("QMP columns skipped (--no-qemu).")
    else:
        qemu, why = find_qemu()
        if qemu is None:
            notes.append(f"QMP columns skipped: {why}.")
    if args.baseline:
        notes.append(f"baseline: a vmipc VMM run from {args.baseline}.")
    if rounds > 1:
        notes.append(f"{rounds} rounds, each server measured once per round, samples pooled.")
    with tempfile.TemporaryDirectory(prefix="vmipc-bench-") as tmp:
        for _ in range(rounds):
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
    report(results, notes)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
