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
from vmipc.cli._progress import ProgressView, add_progress_argument, view_for
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


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` (the whole report, its timeline included), ``--timeline`` and
    ``--progress``."""
    add_progress_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (with its timeline)"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print every step with its start and duration (ms since the start) and the "
        "time the VMM reported running its requests (VMM ms: protocol 1.8, else -)",
    )


def progress_hooks(args: argparse.Namespace) -> tuple[ProgressView | None, dict[str, Any]]:
    """The view ``--progress`` asks for, and the sequence's keyword arguments feeding it."""
    view = view_for(args.progress)
    if view is None:
        return None, {}
    return view, {"on_step": view.step, "on_progress": view.update}


def timeline_lines(timeline: list[dict[str, Any]]) -> list[str]:
    """The report's timeline as an aligned table; the concurrent sides of a transfer are
    indented under the step that made it."""
    width = max([len(t["name"]) + (2 if t["within"] else 0) for t in timeline] + [4])
    phases = max([len(t["phase"]) for t in timeline] + [5])
    lines = [f"  {'PHASE':{phases}} {'STEP':{width}} {'START':>9} {'MS':>9} {'VMM MS':>9}"]
    for t in timeline:
        name = f"  {t['name']}" if t["within"] else t["name"]
        ran = [s["ran_s"] for s in t["server"]]
        vmm = f"{sum(ran) * 1000:9.3f}" if ran else f"{'-':>9}"
        lines.append(
            f"  {t['phase']:{phases}} {name:{width}} {t['start_s'] * 1000:9.3f} "
            f"{t['duration_s'] * 1000:9.3f} {vmm}"
        )
    return lines


def print_report(
    report: Any,
    as_json: bool,
    lines: Callable[[dict[str, Any]], list[str]],
    timeline: bool = False,
) -> None:
    data = as_dict(report)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out = lines(data)
    if timeline:
        out += ["timeline   (ms since the start; VMM MS: the VMM's own time for the step)"]
        out += timeline_lines(data["timeline"])
    print("\n".join(out))
