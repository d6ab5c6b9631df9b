"""The stop-and-copy of a live migration, with and without ordered chains (protocol 1.8).

An idle built-in guest (1 vCPU, 256 MiB by default) migrates between two VMMs on this
host, back and forth, alternating: with the stop-and-copy sent as ordered chains (both
VMMs speak 1.8) and with the client told not to use them (the steps one after the
other, with a ``query-dirty`` before the last round, as before 1.8). Reported: the
medians of the downtime each migration's own report gives, and of its steps between
the pause and the destination running, as measured by the client. Compare the ratio:
absolute figures depend on the host and its load.

``--busy``: instead, the issue's busy guest (512 MiB, 1 vCPU, the built-in guest rewriting
a 32 MiB working set flat out: ``ws=32M rate=0``) migrated back and forth under the
default ``MigrationPolicy`` (50 ms, no ``force``), alternately alone and beside a busy
host process (a Python spin loop, started before and killed by its pid after each such
migration): how many converged, the downtime (the report's own), the last round (in the
pause: its bytes and time) and the rate of the rounds while the guest ran (the full pass
and any dirty rounds: bytes over their time, all migrations of the condition), medians
per condition. With ``--checksums`` each condition runs twice as often, alternating the
page streams a local migration sends since protocol 1.10 (``checksum: headers``, pages
not hashed, on the client's own socket pairs) with fully hashed ones (the same socket
pairs, made by a channel factory the client does not know as its own).

    PYTHONPATH=src python benchmarks/bench_stop_and_copy.py [--runs 7] [--memory 256M]
    PYTHONPATH=src python benchmarks/bench_stop_and_copy.py --busy [--runs 7] [--checksums]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import trio
from _common import median, ms, ratio, say, table

from vmipc.client import open_client
from vmipc.sequences import MigrationNotConverged, MigrationPolicy, MigrationReport, migrate
from vmipc.sequences._migrate import LocalDestination, socketpair_channel

#: a host process that keeps one CPU busy (the --busy mode's second condition)
SPIN = "while True: pass"

STEPS = ("pause", "last dirty round", "state", "release-lease", "resume the destination")


def start_vmm(tmp: str, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, f"{name}.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmipc", "vmm", "--socket", sock, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {name} VMM did not start")
        time.sleep(0.02)
    return proc, sock


async def one(src: str, dst: str, ordered: bool) -> tuple[float, dict[str, float]]:
    began: dict[str, float] = {}
    order: list[str] = []

    def on_step(name: str) -> None:
        began[name] = time.monotonic()
        order.append(name)

    async with open_client(src) as s, open_client(dst) as d:
        if not ordered:
            for client in (s, d):  # as a client before 1.8 would
                client.server_info["protocol"] = "1.7"  # type: ignore[typeddict-item]
        report = await migrate(
            s,
            LocalDestination(d, dst),
            policy=MigrationPolicy(max_downtime=0.05, force=True),
            on_step=on_step,
        )
    ended = time.monotonic()
    steps: dict[str, float] = {}
    names = [n for n in order if n in began]
    for i, name in enumerate(names):
        end = began[names[i + 1]] if i + 1 < len(names) else ended
        if name in STEPS:
            steps[name] = end - began[name]
    assert report.downtime_s is not None
    return report.downtime_s, steps


async def one_busy(src: str, dst: str, hashed: bool = False) -> MigrationReport:
    """A migration under the default policy: its report, also when it gave up. ``hashed``:
    full checksums (the same socket pairs, from a factory that is not the client's own)."""
    async with open_client(src) as s, open_client(dst) as d:
        # a wrapper of the default factory: LocalDestination only trusts its own
        channel = functools.partial(socketpair_channel) if hashed else socketpair_channel
        try:
            return await migrate(s, LocalDestination(d, dst, channel), policy=MigrationPolicy())
        except MigrationNotConverged as exc:
            return exc.report


def busy(runs: int, json_path: str | None = None, checksums: bool = False) -> None:
    reports: dict[str, list[MigrationReport]] = defaultdict(list)
    hosts = ("alone", "one busy process")
    conditions: tuple[str, ...] = hosts
    if checksums:
        conditions = tuple(
            f"{host}, {kind}" for host in hosts for kind in ("unhashed", "full checksums")
        )
    runs_total = len(conditions) * runs
    vmm_args = ["--vcpus", "1", "--memory", "512M"]
    guest = ["--guest", "builtin", "--guest-opt", "ws=32M", "--guest-opt", "rate=0"]
    with tempfile.TemporaryDirectory(prefix="vmipc-sc-") as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            proc, here = start_vmm(tmp, "a0", [*guest, *vmm_args])
            procs.append(proc)
            time.sleep(1.0)  # the guest's first pass over its working set
            for i in range(runs_total):
                condition = conditions[i % len(conditions)]
                proc, there = start_vmm(tmp, f"b{i}", ["--incoming", *vmm_args])
                procs.append(proc)
                spinner = None
                if not condition.startswith("alone"):
                    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
                    procs.append(spinner)
                    time.sleep(0.2)
                try:
                    hashed = condition.endswith("full checksums")
                    report = trio.run(one_busy, here, there, hashed)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                reports[condition].append(report)
                if report.outcome == "migrated":
                    here = there  # else the source runs on; the destination is dropped
                else:
                    proc.kill()
                    proc.wait()
                time.sleep(0.3)  # the guest works on before the next migration
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    if json_path:
        raw = {
            condition: [
                {
                    "outcome": r.outcome,
                    "downtime_s": r.downtime_s,
                    "rounds": [
                        {"kind": x.kind, "bytes": x.bytes, "seconds": x.seconds}
                        for x in r.round_details
                    ],
                }
                for r in done
            ]
            for condition, done in reports.items()
        }
        with open(json_path, "w") as out:
            json.dump(raw, out, indent=1)
    rows = []
    for condition in conditions:
        done = reports[condition]
        converged = [r for r in done if r.outcome == "migrated"]
        lasts = [r.round_details[-1] for r in converged if r.round_details]
        dirty = [x for r in done for x in r.round_details if x.kind != "final" and x.seconds > 0]
        rate = sum(x.bytes for x in dirty) / sum(x.seconds for x in dirty) if dirty else None
        rows.append(
            [
                condition,
                f"{len(converged)}/{len(done)}",
                ms(median([r.downtime_s for r in converged if r.downtime_s is not None]))
                if converged
                else "—",
                f"{median([x.bytes for x in lasts]) / (1 << 20):.1f} MiB" if lasts else "—",
                ms(median([x.seconds for x in lasts])) if lasts else "—",
                f"{rate / 1e9:.2f} GB/s" if rate else "—",
                f"{median([float(r.rounds) for r in done]):.0f}",
            ]
        )
    say(
        "512 MiB built-in guest rewriting 32 MiB flat out (ws=32M rate=0), 1 vCPU, the "
        f"default MigrationPolicy; {runs} migrations per condition, alternating; medians"
    )
    say(
        table(
            [
                "host",
                "converged",
                "downtime",
                "last round",
                "last round time",
                "rounds while running",
                "rounds",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="migrations per mode")
    parser.add_argument("--memory", default="256M")
    parser.add_argument(
        "--busy", action="store_true", help="the 32 MiB flat-out guest, alone and beside a spinner"
    )
    parser.add_argument("--json", metavar="FILE", help="--busy: every migration's figures")
    parser.add_argument(
        "--checksums",
        action="store_true",
        help="--busy: alternate unhashed page streams (1.10) with fully hashed ones",
    )
    opts = parser.parse_args()
    if opts.busy:
        busy(opts.runs, opts.json, opts.checksums)
        return
    downtimes: dict[bool, list[float]] = defaultdict(list)
    steps: dict[bool, dict[str, list[float]]] = {True: defaultdict(list), False: defaultdict(list)}
    with tempfile.TemporaryDirectory(prefix="vmipc-sc-") as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            vmm_args = ["--vcpus", "1", "--memory", opts.memory]
            proc, here = start_vmm(tmp, "a0", ["--guest", "builtin", *vmm_args])
            procs.append(proc)
            for i in range(2 * opts.runs):
                ordered = i % 2 == 0
                proc, there = start_vmm(tmp, f"b{i}", ["--incoming", *vmm_args])
                procs.append(proc)
                downtime, timed = trio.run(one, here, there, ordered)
                downtimes[ordered].append(downtime)
                for name, seconds in timed.items():
                    steps[ordered][name].append(seconds)
                here = there
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    rows = []
    for name in ("downtime (own report)", *STEPS):
        if name.startswith("downtime"):
            a, b = median(downtimes[True]), median(downtimes[False])
        else:
            if not steps[True][name] or not steps[False][name]:
                continue
            a, b = median(steps[True][name]), median(steps[False][name])
        rows.append([name, ms(b), ms(a), ratio(a, b)])
    say(
        f"stop-and-copy of an idle {opts.memory} guest, 1 vCPU, medians of {opts.runs} "
        "migrations each (alternating)"
    )
    say(table(["", "sequential (1.7)", "ordered chains (1.8)", "ratio"], rows))


if __name__ == "__main__":
    main()
