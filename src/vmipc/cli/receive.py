"""``vmipc receive``: the destination side of a migration across hosts.

    vmipc receive --listen HOST:PORT [--token-file F | --tls-cert C --tls-key K --tls-ca CA
                  [--tls-peer-name NAME] | --insecure] [--memory SIZE] [--vcpus N]
                  [--hello-timeout SECONDS] [--socket PATH] [--console PATH]
                  [--vmm-log PATH] [--accept-timeout SECONDS] [--disk FILE[,readonly]]
                  [--json]

Accepts one TCP connection from ``vmipc migrate --to tcp:HOST:PORT`` and feeds what
arrives straight into an incoming VMM: the one at --socket, or one it starts (``vmipc vmm
--incoming`` with the source's RAM and vCPU count, console to --console), which keeps
running after this command exits when the migration succeeds. Prints ``listening on
HOST:PORT`` first (PORT 0 picks a free port). The connection is TLS 1.3 with mutual
authentication; without credentials only a loopback address is allowed, unless --insecure.
A peer that does not authenticate within --hello-timeout is dropped (one line on stderr)
and the receiver listens on. The source's RAM and vCPUs must be --memory/--vcpus when
given, else at most 4 GiB and the host's CPU count. If anything fails before the switch-over the
destination VMM is told to quit. Exit codes: 0 the guest runs here; 1 the migration failed
(the destination was discarded); 2 bad usage; 3 cannot listen or reach the VMM.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmipc.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_USAGE
from vmipc.cli._sequence import print_report, run_sequence
from vmipc.cli._tls import add_tls_arguments, credentials_of
from vmipc.sequences import (
    HELLO_TIMEOUT,
    Credentials,
    CredentialsError,
    ReceiveReport,
    Shape,
    listen,
    parse_address,
    receive,
)
from vmipc.vmm.devices import parse_disk_option

PROG = "vmipc receive"


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "receive",
        help="receive one migration over TCP into an incoming VMM",
        description=(
            "Accept one `vmipc migrate --to tcp:HOST:PORT` and feed it into an incoming "
            "VMM (the one at --socket, or one started here). See docs/sequences.md."
        ),
        epilog="exit codes: 0 the guest runs here; 1 failed; 2 bad usage; 3 environment",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to listen")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="an incoming VMM's control socket (default: start one)",
    )
    parser.add_argument(
        "--console",
        default="/dev/null",
        metavar="PATH",
        help="with no --socket: the started VMM's console file (default /dev/null)",
    )
    parser.add_argument(
        "--vmm-log", metavar="PATH", help="with no --socket: the started VMM's stderr"
    )
    parser.add_argument(
        "--accept-timeout",
        type=float,
        metavar="SECONDS",
        help="give up if nobody connects within this time",
    )
    parser.add_argument(
        "--hello-timeout",
        type=float,
        default=HELLO_TIMEOUT,
        metavar="SECONDS",
        help=f"drop a peer that has not authenticated and said hello by then "
        f"(default {HELLO_TIMEOUT:g})",
    )
    parser.add_argument(
        "--memory", metavar="SIZE", help="accept only a guest of this RAM (e.g. 64M, 1G)"
    )
    parser.add_argument("--vcpus", type=int, metavar="N", help="accept only this vCPU count")
    parser.add_argument(
        "--disk",
        metavar="FILE[,readonly]",
        help=(
            "shared storage: open this disk image (the source's) here and pass it to the "
            "incoming VMM (attach-disk; one given with --socket must have been started "
            "without --disk). It refuses the state if it is not the source's disk"
        ),
    )
    add_tls_arguments(parser, "receiver")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)


def _shape(args: argparse.Namespace) -> Shape:
    """The shape the options pin (ValueError for a bad size or count)."""
    from vmipc.vmm.memory import parse_size

    memory = None if args.memory is None else parse_size(args.memory)
    if args.vcpus is not None and args.vcpus < 1:
        raise ValueError("--vcpus must be positive")
    return Shape(memory=memory, vcpus=args.vcpus)


def run(args: argparse.Namespace) -> int:
    try:
        address = parse_address(args.listen)
        shape = _shape(args)
        disk, disk_readonly = (None, False) if not args.disk else parse_disk_option(args.disk)
        if args.hello_timeout <= 0:
            raise ValueError("--hello-timeout must be positive")
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        credentials: Credentials | None = credentials_of(args, address[0] or "0.0.0.0")
    except CredentialsError as exc:
        print(f"{PROG}: refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        listener = listen(address)
    except OSError as exc:
        print(f"{PROG}: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    host, port = listener.getsockname()[:2]
    secured = "plain TCP" if credentials is None else f"TLS, {credentials.mode}"
    print(f"listening on {host}:{port}", flush=True)
    print(f"{PROG}: listening on {host}:{port} ({secured})", file=sys.stderr, flush=True)

    def refused(line: str) -> None:
        print(f"{PROG}: dropped a peer: {line}", file=sys.stderr, flush=True)

    async def main() -> ReceiveReport:
        return await receive(
            listener,
            vmm_socket=args.socket,
            console=args.console,
            vmm_log=args.vmm_log,
            accept_timeout=args.accept_timeout,
            credentials=credentials,
            hello_timeout=args.hello_timeout,
            shape=shape,
            on_refused=refused,
            disk=disk,
            disk_readonly=disk_readonly,
        )

    code, report = run_sequence(PROG, main)
    listener.close()
    if report is None:
        return code
    print_report(
        report,
        args.json,
        lambda d: [
            f"outcome    {d['outcome']}" + (f": {d['reason']}" if d["reason"] else ""),
            f"from       {d['peer']}",
            f"vmm        {d['socket']}" + (f" (pid {d['pid']})" if d["pid"] else ""),
            f"transfers  {d['transfers']}",
            f"total      {d['total_s'] * 1000:.1f} ms",
        ],
    )
    return 0 if report.outcome == "running" else EXIT_FAILED
