"""``vmipc restore``: restore a snapshot file into an incoming VMM.

    vmipc restore [--socket PATH] FILE [--parent FILE]... [--chain-dir DIR] [--paused]
                  [--verify] [--disk FILE[,readonly] | --disk-from-snapshot NEWIMG] [--force-disk]
                  [--quit-on-failure] [--json] [--timeline] [--progress MODE]

The VMM is one started with ``vmipc vmm --incoming --socket PATH`` (no --memory/--vcpus
needed: the machine is built from the file). Sends load-memory and load-state (both with
format snapshot; the VMM checks the file as ``vmm --restore`` does and maps its memory
section lazily; ``--verify`` checks every checksum first, reading all of it) and resume.
An incremental FILE is restored with its chain: its parents are found among the
``--parent`` files and the snapshots in ``--chain-dir``, every link checked (parent id and
table checksum), then the base is loaded and each increment's pages applied in order.
Exit codes: 0 done; 1 a step failed (the incoming VM does not run); 2 bad usage; 3 the VMM
cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmipc.cli import EXIT_USAGE
from vmipc.cli._sequence import (
    add_output_arguments,
    add_socket_argument,
    print_report,
    progress_hooks,
    run_sequence,
    socket_path,
)
from vmipc.client import open_client
from vmipc.sequences import RestoreReport, restore_into
from vmipc.vmm.devices import parse_disk_option

PROG = "vmipc restore"


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "restore",
        help="restore a snapshot file into an incoming VMM",
        description=(
            "Restore a snapshot file into a VMM started with `vmipc vmm --incoming`: "
            "load-memory and load-state from the file, then resume. See docs/sequences.md."
        ),
        epilog="exit codes: 0 done; 1 a step failed; 2 bad usage; 3 VMM unreachable",
    )
    add_socket_argument(parser)
    parser.add_argument("file", metavar="FILE", help="the snapshot file")
    parser.add_argument(
        "--parent",
        metavar="FILE",
        action="append",
        default=[],
        help="a parent snapshot of an incremental FILE (repeat for the whole chain)",
    )
    parser.add_argument(
        "--chain-dir",
        metavar="DIR",
        help="look for the parents of an incremental FILE among the snapshots in DIR",
    )
    parser.add_argument("--paused", action="store_true", help="leave the restored VM paused")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every checksum of the files first, the memory's too (reads all of it)",
    )
    parser.add_argument(
        "--disk",
        metavar="FILE[,readonly]",
        help=(
            "open this disk image here and pass it to a VMM started without --disk "
            "(attach-disk). Either way the VMM's disk must be the snapshot's: its size and "
            "fingerprint (a disk written since the snapshot is refused too), unless "
            "--force-disk"
        ),
    )
    parser.add_argument(
        "--disk-from-snapshot",
        metavar="NEWIMG",
        help=(
            "write the snapshot's disk section (checkpoint --with-disk) out to the new "
            "image NEWIMG (never over an existing file) and pass it to a VMM started "
            "without --disk, in its recorded mode; removed again if the restore fails"
        ),
    )
    parser.add_argument(
        "--force-disk",
        action="store_true",
        help=(
            "restore even if the VMM's disk is not the snapshot's (another size or "
            "fingerprint: load-state accept_disk); its mode must still match"
        ),
    )
    parser.add_argument(
        "--quit-on-failure",
        action="store_true",
        help="tell the incoming VMM to quit when the restore fails",
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = socket_path(args, PROG)
    if path is None:
        return EXIT_USAGE

    disk, disk_readonly = None, False
    if args.disk:
        try:
            disk, disk_readonly = parse_disk_option(args.disk)
        except ValueError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.disk and args.disk_from_snapshot:
        print(f"{PROG}: --disk and --disk-from-snapshot exclude each other", file=sys.stderr)
        return EXIT_USAGE
    view, hooks = progress_hooks(args)

    async def main() -> RestoreReport:
        async with open_client(path, client_name=PROG) as client:
            return await restore_into(
                client,
                args.file,
                resume=not args.paused,
                discard_on_failure=args.quit_on_failure,
                parents=args.parent,
                chain_dir=args.chain_dir,
                verify=args.verify,
                disk=disk,
                disk_readonly=disk_readonly,
                disk_from_snapshot=args.disk_from_snapshot,
                accept_disk=args.force_disk,
                **hooks,
            )

    try:
        code, report = run_sequence(PROG, main)
    finally:
        if view is not None:
            view.close()
    if report is not None:
        print_report(
            report,
            args.json,
            lambda d: [
                f"restored   {d['path']}: {d['vcpus']} vCPUs, {d['memory_size']} bytes of RAM",
                f"chain      {len(d['chain'])} file(s): {' <- '.join(d['chain'])}",
                f"vm         {d['vm']}",
                f"total      {d['total_s'] * 1000:.1f} ms",
            ],
            args.timeline,
        )
    return code
