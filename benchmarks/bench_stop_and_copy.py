"""The stop-and-copy of a live migration, with and without ordered chains (protocol 1.8).

An idle built-in guest (1 vCPU, 256 MiB by default) migrates between two VMMs on this
host, back and forth, alternating: with the stop-and-copy sent as ordered chains (both
VMMs speak 1.8) and with the client told not to use them (the steps one after the
other, with a ``query-dirty`` before the last round, as before 1.8). Reported: the
medians of the downtime each migration's own report gives, and of its steps between
the pause and the destination running, as measured by the client. Compare the ratio:
absolute figures depend on the host and its load.

    PYTHONPATH=src python benchmarks/bench_stop_and_copy.py [--runs 7] [--memory 256M]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import trio
from _common import median, ms, ratio, say, table

from vmipc.client import open_client
from vmipc.sequences import MigrationPolicy, migrate
from vmipc.sequences._migrate import LocalDestination

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="migrations per mode")
    parser.add_argument("--memory", default="256M")
    opts = parser.parse_args()
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
