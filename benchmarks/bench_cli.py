#!/usr/bin/env python3
"""How long one `vmipc call` takes, wall clock, against `python -c "import msgpack"`
measured in the same run (the floor for any Python client that speaks the protocol).

A shell script that pauses, dumps, resumes and queries runs `vmipc call` four times, so its
start-up is what such a script waits for. Prints a table of medians and the ratio to the
baseline. An incoming VMM (no guest) answers the queries; it is stopped on every path.

Measured with bytecode cached, as in a real install: the vmipc package is byte-compiled
(compileall) first, since with PYTHONDONTWRITEBYTECODE set (or a fresh checkout) every
run would otherwise compile vmipc's sources again, which msgpack (installed, compiled)
never does.

    .venv/bin/python benchmarks/bench_cli.py [--runs 21]
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

PYTHON = sys.executable
#: the issue's target: a `vmipc call` takes at most this many times the baseline
TARGET = 3.0


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def compile_vmipc() -> str:
    """Byte-compile the vmipc package that the runs import (found without importing it,
    so that the child processes see it as this one would). Returns its directory."""
    spec = importlib.util.find_spec("vmipc")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vmipc is not importable")
    where = next(iter(spec.submodule_search_locations))
    if not compileall.compile_dir(where, quiet=1):
        raise SystemExit(f"could not byte-compile {where}")
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    where = compile_vmipc()
    with tempfile.TemporaryDirectory(prefix="vmipc-bench-cli-") as tmp:
        sock = os.path.join(tmp, "vm.sock")
        argv = [PYTHON, "-m", "vmipc", "vmm", "--incoming", "--memory", "64M", "--vcpus", "1"]
        argv += ["--socket", sock, "--console", os.devnull, "--no-console-input"]
        vmm = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if vmm.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the VMM did not start")
                time.sleep(0.01)
            cases = {
                'python -c "import msgpack" (baseline)': [PYTHON, "-c", "import msgpack"],
                "python -m vmipc call --help": [PYTHON, "-m", "vmipc", "call", "--help"],
                "python -m vmipc call query-status": [
                    PYTHON,
                    "-m",
                    "vmipc",
                    "call",
                    "--socket",
                    sock,
                    "query-status",
                ],
            }
            # what a user types: the installed script (no runpy), when there is one beside
            # this Python; it imports the same vmipc (PYTHONPATH comes first)
            script = os.path.join(os.path.dirname(PYTHON), "vmipc")
            if os.access(script, os.X_OK):
                cases["vmipc call query-status (the installed script)"] = [
                    script,
                    "call",
                    "--socket",
                    sock,
                    "query-status",
                ]
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.runs):  # interleaved, so load hits every case alike
                for name, argv in cases.items():
                    samples[name].append(wall(argv))
        finally:
            vmm.kill()
            vmm.wait()
    base = statistics.median(next(iter(samples.values())))
    print(f"`vmipc call` start-up, median of {args.runs} runs (shared 2-core machine)")
    print(f"vmipc from {where}, bytecode compiled first; Python {sys.version.split()[0]}\n")
    print("| command | median ms | min ms | ratio to baseline |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for name, values in samples.items():
        median = statistics.median(values)
        worst = max(worst, median / base)
        print(f"| {name} | {median * 1e3:.1f} | {min(values) * 1e3:.1f} | {median / base:.2f}x |")
    verdict = "holds" if worst <= TARGET else "does not hold"
    print(f"\nthe target (at most {TARGET:g}x the baseline, medians of one run) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
