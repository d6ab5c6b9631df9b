"""Shared by the sequence commands (checkpoint, suspend, restore, migrate, receive):
the socket argument, running a sequence, one-line errors and exit codes, report output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from vmipc.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmipc.client import ClosedByPeer, CommandError, ProtocolError
from vmipc.sequences import DEFAULT_LEASE, SequenceError, as_dict

SOCKET_ENV = "VMIPC_SOCKET"
T = TypeVar("T")


def add_socket_argument(parser: argparse.ArgumentParser, help: str = "") -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=help or f"the VMM's control socket (default ${SOCKET_ENV})",
    )


def add_lease_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help=f"{what} is a pause lease of this length, renewed while it lasts: if this "
        f"command dies or hangs, the VMM resumes the guest by itself (default "
        f"{DEFAULT_LEASE:g}; 0 for a plain pause)",
    )


def lease_of(args: argparse.Namespace) -> float | None:
    return float(args.lease) if args.lease > 0 else None


def socket_path(args: argparse.Namespace, prog: str) -> str | None:
    path: str | None = args.socket or os.environ.get(SOCKET_ENV)
    if not path:
        print(f"{prog}: no socket: pass --socket PATH or set ${SOCKET_ENV}", file=sys.stderr)
    return path


def run_sequence(prog: str, main: Callable[[], Awaitable[T]]) -> tuple[int, T | None]:
    """Run ``main`` under trio; turn every failure into one line and an exit code."""
    try:
        return EXIT_OK, trio.run(main)
    except SequenceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED, None
    except CommandError as exc:
        print(
            f"{prog}: {exc.command or 'command'} refused: {exc.code}: {exc.message}",
            file=sys.stderr,
        )
        return EXIT_FAILED, None
    except (ClosedByPeer, ProtocolError) as exc:
        print(f"{prog}: the VMM broke the connection: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT, None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ENVIRONMENT, None
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE, None


def print_report(report: Any, as_json: bool, lines: Callable[[dict[str, Any]], list[str]]) -> None:
    data = as_dict(report)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines(data)))
