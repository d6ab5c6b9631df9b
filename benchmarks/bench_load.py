#!/usr/bin/env python3
"""What a full load of control clients costs a checkpoint and a live migration.

Prints a Markdown table of medians: the checkpoint's pause (pause -> resume, the
``downtime_s`` of its report) and the migration's downtime (source paused -> destination
running) and total time, **idle** (no other client) and **under load** (64 clients, in a
process of their own, each sending ``query-status`` back to back, every fourth call
``query-dirty``), with the ratio loaded / idle measured in the same run. Runs alternate
idle and loaded, so a noisy machine affects both alike.

The sequences go first (protocol 1.4, ``vmipc.server._priority``): the checkpoint while
it holds its pause lease, the migration by ``claim-priority`` for its whole run; the load's
requests are then held at the server's ``held_request_rate`` (200/s). A third set of
loaded runs starts the source VMM with ``--held-request-rate inf``: nobody's requests are
held, every connection is served in turn (as before 1.4), which shows what going first is
worth.

One run: a fresh ``vmipc vmm`` (built-in guest, 2 vCPUs, 64M, ``ws=512K``) and an
incoming one; once the guest printed its first pass (and the load clients are connected
and calling), ``vmipc.sequences.checkpoint`` to a file (the VM runs on), then
``vmipc.sequences.migrate`` to the incoming VMM (``force=True``: a run always ends with a
downtime; whether pre-copy converged by the default policy is counted); the source quits,
which ends the load.

Run: ``.venv/bin/python benchmarks/bench_load.py [--quick] [--runs N] [--json FILE]``. The
default (5 runs each, after a warm-up) takes about 45 s, ``--quick`` (3 each) about
25 s. It needs a usable /dev/kvm. No QEMU column: QEMU has no comparable control-client
load (its QMP monitor serialises clients on one thread); the baseline is the idle run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from _common import median, ms, progress, ratio, say, table

from vmipc.client import ClosedByPeer, CommandError, open_client
from vmipc.sequences import LocalDestination, MigrationPolicy, checkpoint, migrate

#: the load the issue asks for: 64 clients (the server accepts 128 connections)
CLIENTS = 64
WS = "512K"
MEMORY = "64M"
VCPUS = 2
#: a load client stops by itself after this long (the source quitting normally ends it)
LOAD_SECONDS = 60.0


# --- the load: a child process of CLIENTS connections ---------------------------------------


async def load_main(socket: str, clients: int) -> dict[str, Any]:
    counts = {"calls": 0, "dirty_ok": 0, "dirty_off": 0, "closed": 0, "errors": 0}
    connected = 0
    everyone = trio.Event()
    first_error: list[str] = []

    async def one(number: int) -> None:
        nonlocal connected
        deadline = time.monotonic() + LOAD_SECONDS
        try:
            async with open_client(socket, client_name=f"load {number}") as client:
                connected += 1
                if connected == clients:
                    everyone.set()
                await everyone.wait()
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    if n % 4 == 0:
                        try:
                            await client.query_dirty()
                            counts["dirty_ok"] += 1
                        except CommandError as exc:
                            if exc.code != "dirty-log-off":
                                raise
                            counts["dirty_off"] += 1
                    else:
                        await client.query_status()
                    counts["calls"] += 1
        except ClosedByPeer:
            counts["closed"] += 1  # the source quit after the migration
        except CommandError as exc:
            if exc.code == "shutting-down":
                counts["closed"] += 1
            else:
                counts["errors"] += 1
                first_error.append(str(exc))
        except Exception as exc:
            counts["errors"] += 1
            first_error.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for number in range(clients):
            nursery.start_soon(one, number)
        with trio.move_on_after(30):
            await everyone.wait()
            print("ready", flush=True)
    return {
        **counts,
        "seconds": time.monotonic() - started,
        "connected": connected,
        "first_error": first_error[:1],
    }


def load_child(socket: str, clients: int) -> int:
    result = trio.run(load_main, socket, clients)
    print(json.dumps(result), flush=True)
    return 0


# --- one run --------------------------------------------------------------------------------


#: the kinds of run: no load; the load, the sequences going first; the load, served in turn
MODES = ("idle", "first", "in turn")


@dataclass
class Run:
    mode: str
    checkpoint_pause_s: float
    migration_downtime_s: float
    migration_total_s: float
    rounds: int
    converged: bool
    load: dict[str, Any] | None


def start_vmm(tmp: Path, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp / f"{name}.sock")
    argv = [sys.executable, "-m", "vmipc", "vmm", *args, "--socket", sock]
    argv += ["--console", str(tmp / f"{name}.console"), "--no-console-input"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vmipc vmm {name} did not start")
        time.sleep(0.01)
    return proc, sock


def wait_for_first_pass(console: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if console.exists() and console.read_text(errors="replace").count(" pass=") >= VCPUS:
            return
        time.sleep(0.01)
    raise RuntimeError("the guest printed no pass line")


def one_run(mode: str, clients: int) -> Run:
    tmp = Path(tempfile.mkdtemp(prefix="vmipc-bench-load-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        guest = ["--guest", "builtin", "--vcpus", str(VCPUS), "--memory", MEMORY]
        if mode == "in turn":
            guest += ["--held-request-rate", "inf"]
        src, src_sock = start_vmm(tmp, "src", [*guest, "--guest-opt", f"ws={WS}"])
        procs.append(src)
        dst, dst_sock = start_vmm(tmp, "dst", ["--incoming", "--memory", MEMORY, "--vcpus", "2"])
        procs.append(dst)
        wait_for_first_pass(tmp / "src.console")
        child = None
        if mode != "idle":
            argv = [sys.executable, __file__, "--load-child", src_sock, "--clients", str(clients)]
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            procs.append(child)
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the load clients did not all connect")
            time.sleep(0.2)  # let the load settle into its stride

        async def sequences() -> tuple[Any, Any]:
            async with (
                open_client(src_sock, client_name="bench") as s,
                open_client(dst_sock, client_name="bench") as d,
            ):
                cp = await checkpoint(s, str(tmp / "cp.snap"), verify=False)
                await trio.sleep(0.2)
                mig = await migrate(
                    s,
                    LocalDestination(d, dst_sock),
                    policy=MigrationPolicy(force=True, timeout=30),
                )
                return cp, mig

        cp, mig = trio.run(sequences)
        load = None
        if child is not None:
            out, _ = child.communicate(timeout=LOAD_SECONDS + 30)
            load = json.loads(out.strip().splitlines()[-1])

        async def quit_dst() -> None:
            async with open_client(dst_sock) as d:
                await d.quit()

        trio.run(quit_dst)
        return Run(
            mode,
            cp.downtime_s,
            mig.downtime_s,
            mig.total_s,
            mig.rounds,
            mig.converged,
            load,
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


# --- report -------------------------------------------------------------------------------


def report(runs: list[Run], clients: int) -> None:
    by_mode = {mode: [r for r in runs if r.mode == mode] for mode in MODES}
    idle, first, in_turn = by_mode.values()

    def row(name: str, values: str) -> list[str]:
        a, b, c = (median([getattr(r, values) for r in by_mode[m]]) for m in MODES)
        return [name, ms(a), ms(b), ratio(b, a), ms(c), ratio(c, a)]

    def count(name: str, cell: Any) -> list[str]:
        return [name, cell(idle), cell(first), "—", cell(in_turn), "—"]

    say(f"## Sequences under a load of {clients} control clients")
    say()
    say(
        table(
            [
                "median of runs",
                f"idle ({len(idle)} runs)",
                f"{clients} clients, sequence first",
                "/ idle",
                f"{clients} clients, served in turn",
                "/ idle",
            ],
            [
                row("checkpoint pause (pause → resume)", "checkpoint_pause_s"),
                row("migration downtime (paused → destination running)", "migration_downtime_s"),
                row("migration total", "migration_total_s"),
                count("pre-copy rounds (median)", lambda rs: f"{median([r.rounds for r in rs]):g}"),
                count(
                    "converged by the default policy",
                    lambda rs: f"{sum(r.converged for r in rs)}/{len(rs)}",
                ),
            ],
        )
    )
    say()
    for mode, runs_of_mode in (("sequence first", first), ("served in turn", in_turn)):
        loads = [r.load for r in runs_of_mode if r.load]
        rates = [load["calls"] / load["seconds"] for load in loads if load["seconds"] > 0]
        errors = sum(load["errors"] for load in loads)
        say(
            f"Load, {mode}: {median(rates):.0f} calls/s in all (median of runs, whole run "
            f"incl. connecting), {sum(load['dirty_ok'] for load in loads)} query-dirty "
            f"answered and {sum(load['dirty_off'] for load in loads)} dirty-log-off, "
            f"{sum(load['closed'] for load in loads)} connections closed by the source's "
            f"quit, {errors} other errors"
            + (f" (first: {loads[0]['first_error']})" if errors else "")
            + "."
        )
    say(f"{os.cpu_count()} CPUs; the load, the sequence's client and both VMMs share them.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs each (~25 s)")
    parser.add_argument("--runs", type=int, help="runs of each kind (default 5)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", help="also write every run")
    parser.add_argument("--load-child", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        return load_child(args.load_child, args.clients)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_load: needs a usable /dev/kvm", file=sys.stderr)
        return 3
    runs_each = args.runs or (3 if args.quick else 5)
    progress("warm-up")
    for mode in MODES:
        one_run(mode, args.clients)
    runs: list[Run] = []
    for i in range(runs_each):
        for mode in MODES:
            progress(f"run {i + 1}/{runs_each} {mode}")
            runs.append(one_run(mode, args.clients))
    report(runs, args.clients)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
