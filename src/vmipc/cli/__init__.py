"""The ``vmipc`` command: argument parsing and output only; the logic lives below.

Exit codes (all subcommands): 0 success; 1 the operation failed (guest crashed, command
refused); 2 bad usage or input; 3 the environment cannot run it (no /dev/kvm, no memory);
130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

#: subcommand modules, each exporting add_parser(subparsers) and run(args) -> int
_SUBCOMMANDS = (
    "vmipc.cli.vmm",
    "vmipc.cli.call",
    "vmipc.cli.snapshot",
    "vmipc.cli.checkpoint",
    "vmipc.cli.restore",
    "vmipc.cli.migrate",
    "vmipc.cli.receive",
    "vmipc.cli.demo",
)


def terminal_width() -> int:
    """shutil.get_terminal_size's columns, without importing shutil: argparse imports it
    (and with it bz2, lzma, fnmatch: ~2 ms) for every parser's width, and `vmipc call`
    is for scripts that run it many times."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, its width found without shutil (see :func:`terminal_width`)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = terminal_width() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's RawDescriptionHelpFormatter, its width found without shutil."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or, when ``argv`` names a subcommand first, a parser with only
    that one: `vmipc call` is for scripts that chain many calls, and importing every
    subcommand would load the VMM and trio for each of them."""
    parser = argparse.ArgumentParser(
        prog="vmipc",
        description="Control a KVM VMM with small building-block commands.",
        formatter_class=HelpFormatter,
    )
    # prog given: argparse would make a help formatter (and import shutil) to find it
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, prog="vmipc"
    )
    modules: tuple[str, ...] = _SUBCOMMANDS
    if argv and f"vmipc.cli.{argv[0]}" in _SUBCOMMANDS:
        modules = (f"vmipc.cli.{argv[0]}",)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vmipc`` command with ``argv`` (default: this process's arguments)."""
    return _main(argv, own_process=False)


def entry_point() -> None:
    """``vmipc`` and ``python -m vmipc``: the command is the whole process."""
    sys.exit(_main(None, own_process=True))


def _main(argv: Sequence[str] | None, *, own_process: bool) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # Building the parser imports the subcommand and what it uses: thousands of objects
    # that live as long as the process. The cyclic GC, left on, traverses them again and
    # again while they are made (about 5 ms of a `vmipc call`, for nothing to free).
    gc.disable()
    try:
        parser = build_parser(argv)
    finally:
        if own_process:
            # and no later collection (nor the one at exit) traverses them again: ~3 ms
            # more. Only when the process is the command's: a program that calls main()
            # keeps all of its own objects collectable
            gc.freeze()
        gc.enable()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        print("vmipc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result
