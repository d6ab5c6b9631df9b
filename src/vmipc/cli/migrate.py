"""``vmipc migrate``: live-migrate a running VM (pre-copy) to another VMM.

    vmipc migrate [--socket SRC] --to DST_SOCKET|tcp:HOST:PORT [--max-downtime MS]
                  [--max-rounds N] [--timeout SECONDS] [--force] [--lease SECONDS]
                  [--disk FILE[,readonly]] [--json] [--timeline] [--progress MODE]
                  [--token-file F | --tls-cert C --tls-key K --tls-ca CA
                   [--tls-peer-name NAME] | --insecure]

DST_SOCKET is the control socket of a local ``vmipc vmm --incoming`` (given the source's shape);
``tcp:HOST:PORT`` is a ``vmipc receive --listen HOST:PORT`` on another host, reached over
TLS 1.3 with mutual authentication (certificates or a token file; plain TCP only to a
loopback address, or with --insecure). Locally, memory goes from VMM to VMM through a
socket pair, never through this process; over TLS this process encrypts it.

Policy: dirty rounds go on while the predicted downtime (dirty bytes ÷ the rate measured
in the previous round) is above --max-downtime and the rounds make progress, up to
--max-rounds and --timeout. If it does not converge the migration gives up cleanly: the
source runs on and the destination is discarded — unless --force, which stops the source
anyway and accepts the longer downtime. The source is paused with a pause lease
(--lease): if this command dies before the switch-over, the source VMM resumes the guest.

Exit codes: 0 migrated (the destination runs, the source quit); 1 a step failed or it
gave up (one line says which VM runs); 2 bad usage; 3 a VMM cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from vmipc.cli import EXIT_FAILED, EXIT_USAGE
from vmipc.cli._sequence import (
    add_lease_argument,
    add_output_arguments,
    add_socket_argument,
    lease_of,
    print_report,
    progress_hooks,
    run_sequence,
    socket_path,
)
from vmipc.cli._tls import add_tls_arguments, credentials_of
from vmipc.sequences import (
    DEFAULT_MAX_DOWNTIME,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_TIMEOUT,
    MigrationNotConverged,
    MigrationPolicy,
    MigrationReport,
    migrate_local,
)
from vmipc.vmm.devices import parse_disk_option

PROG = "vmipc migrate"


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "migrate",
        help="live-migrate a running VM to another VMM (pre-copy)",
        description=(
            "Live-migrate the running VM behind --socket to an incoming VMM: full pass, "
            "dirty rounds while the guest runs, then pause, last pages and state, resume "
            "at the destination, quit the source. See docs/sequences.md."
        ),
        epilog="exit codes: 0 migrated; 1 failed or gave up; 2 bad usage; 3 VMM unreachable",
    )
    add_socket_argument(parser, "the source VMM's control socket (default $VMIPC_SOCKET)")
    parser.add_argument(
        "--to",
        required=True,
        metavar="DST",
        help="the destination: an incoming VMM's control socket, or tcp:HOST:PORT",
    )
    parser.add_argument(
        "--max-downtime",
        type=float,
        default=DEFAULT_MAX_DOWNTIME * 1000,
        metavar="MS",
        help="stop the source once the predicted downtime is at most this (default 50)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=DEFAULT_MAX_ROUNDS,
        metavar="N",
        help=f"most dirty rounds before giving up (default {DEFAULT_MAX_ROUNDS})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up pre-copy after this long (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="when it does not converge, stop the source anyway instead of giving up",
    )
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help=(
            "stop the source as soon as the predicted downtime is short enough (default: go "
            "on with dirty rounds while each is expected to halve what is dirty, so that the "
            "last round, paused, is as small as pre-copy can make it)"
        ),
    )
    parser.add_argument(
        "--disk",
        metavar="FILE[,readonly]",
        help=(
            "shared storage: open this disk image (the source's) here and pass it to a local "
            "destination started without --disk (attach-disk). The destination refuses the "
            "state if it is not the source's disk (size and fingerprint)"
        ),
    )
    add_lease_argument(parser, "the source's pause")
    add_tls_arguments(parser, "sender")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def _lines(data: dict[str, Any]) -> list[str]:
    downtime = data["downtime_s"]
    lines = [
        f"outcome    {data['outcome']}"
        + (" (forced: did not converge)" if data["forced"] else "")
        + (f": {data['reason']}" if data["reason"] else ""),
        f"source     {data['source']}",
        f"dest       {data['destination']}",
        f"total      {data['total_s'] * 1000:.1f} ms",
        f"downtime   {'-' if downtime is None else f'{downtime * 1000:.1f} ms'}",
        f"rounds     {data['rounds']} dirty rounds after the full pass"
        + (f", {data['settle_rounds']} of them once converged" if data["settle_rounds"] else ""),
        f"bytes      {data['bytes']} of pages, {data['state_bytes']} of state",
        f"  {'ROUND':>5} {'KIND':6} {'DIRTY':>8} {'DATA':>8} {'ZERO':>8} {'BYTES':>12} {'MS':>8}",
    ]
    for r in data["round_details"]:
        dirty = "-" if r["dirty_pages"] is None else str(r["dirty_pages"])
        lines.append(
            f"  {r['number']:5} {r['kind']:6} {dirty:>8} {r['data_pages']:8} "
            f"{r['zero_pages']:8} {r['bytes']:12} {r['seconds'] * 1000:8.1f}"
        )
    return lines


def _policy(args: argparse.Namespace) -> MigrationPolicy | None:
    """The policy the options give, or None when they make none (or a negative lease)."""
    if args.lease < 0:
        return None
    try:
        return MigrationPolicy(
            max_downtime=args.max_downtime / 1000,
            max_rounds=args.max_rounds,
            timeout=args.timeout,
            force=args.force,
            settle=args.settle,
        )
    except ValueError:
        return None


def _migration(
    source: str, args: argparse.Namespace, options: dict[str, Any]
) -> Callable[[], Awaitable[MigrationReport]]:
    """The migration to run: to a local socket, or to ``tcp:HOST:PORT`` (ValueError for a
    bad address or unusable credentials)."""
    to: str = args.to
    if not to.startswith("tcp:"):
        if args.disk:
            path, readonly = parse_disk_option(args.disk)
            options = {**options, "disk": path, "disk_readonly": readonly}
        return lambda: migrate_local(source, to, **options)
    if args.disk:
        raise ValueError("--disk goes with a local --to (the destination's socket)")
    from vmipc.sequences import CredentialsError, migrate_tcp, parse_address

    address = parse_address(to.removeprefix("tcp:"))
    try:
        credentials = credentials_of(args, address[0])
    except CredentialsError as exc:
        raise ValueError(f"refused: {exc}") from None
    return lambda: migrate_tcp(source, address, credentials, **options)


def run(args: argparse.Namespace) -> int:
    source = socket_path(args, PROG)
    if source is None:
        return EXIT_USAGE
    policy = _policy(args)
    if policy is None:
        print(
            f"{PROG}: --max-downtime, --max-rounds, --timeout and --lease must be positive",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        view, hooks = progress_hooks(args)
        main = _migration(source, args, {"policy": policy, "lease": lease_of(args), **hooks})
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    gave_up: list[MigrationReport] = []

    async def guarded() -> MigrationReport:
        try:
            return await main()
        except MigrationNotConverged as exc:
            gave_up.append(exc.report)
            raise

    try:
        code, report = run_sequence(PROG, guarded)
    finally:
        if view is not None:
            view.close()
    if report is None and gave_up:
        report = gave_up[0]
        code = EXIT_FAILED
    if report is not None:
        print_report(report, args.json, _lines, args.timeline)
    return code
