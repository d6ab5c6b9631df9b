"""`vmipc call` is for scripts that chain commands: it loads nothing it does not use. The
blocking client needs neither trio nor the VMM, and parsing `call`'s arguments needs no
other subcommand. Nor does it load what only made its start-up slow: dataclasses (and
inspect under it), logging, pathlib, shutil, copy, the result TypedDicts. (The speed
itself is measured in benchmarks/bench_cli.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.control_support import serving

#: what a `vmipc call` must not import
HEAVY = ("trio", "vmipc.vmm", "vmipc.kvm", "vmipc.sequences", "vmipc.server", "vmipc.cli.vmm")


#: what neither `vmipc call --help` nor a call loads: each cost its start-up a few ms
UNUSED = (
    "dataclasses",
    "inspect",
    "logging",
    "pathlib",
    "shutil",
    "copy",
    "base64",
    "vmipc.client._results",
    "vmipc.client._async",
)


def run_probe(*argv: str) -> tuple[set[str], str]:
    """The modules loaded by ``vmipc ARGV`` (run as ``python -m vmipc`` does), and its
    standard output."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['vmipc', *{list(argv)!r}]\n"
        "try:\n"
        "    runpy.run_module('vmipc', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    return set(done.stderr.split()), done.stdout


def modules_loaded_by(*argv: str) -> set[str]:
    return run_probe(*argv)[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "--help"],
        ["call", "--socket", "/nonexistent/vm.sock", "query-status"],
    ],
    ids=["help", "a-call"],
)
def test_vmipc_call_loads_neither_trio_nor_the_vmm(argv: list[str]) -> None:
    loaded = modules_loaded_by(*argv)
    assert "vmipc.cli.call" in loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"vmipc call imported {heavy}"


@pytest.mark.parametrize("argv", [["call", "--help"], ["query-status"]], ids=["help", "a-call"])
def test_vmipc_call_loads_only_what_it_uses(argv: list[str]) -> None:
    with serving() as served:
        if argv[0] != "call":  # a call answered by a server, its catalogue read and all
            argv = ["call", "--socket", served.path, *argv]
        loaded, out = run_probe(*argv)
    assert "vmipc.cli.call" in loaded
    if argv[-1] == "query-status":
        assert "memory_size:" in out, "the call did not succeed"
        assert "textwrap" not in loaded  # only help wraps text
    unused = sorted(m for m in loaded if m in UNUSED)
    assert unused == [], f"vmipc {' '.join(argv)} imported {unused}"


def test_the_top_level_help_still_lists_every_subcommand() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmipc", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for name in ("vmm", "call", "snapshot", "checkpoint", "restore", "migrate", "receive"):
        assert name in done.stdout
