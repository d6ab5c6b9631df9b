"""``vmipc checkpoint`` and ``vmipc suspend``: a VM's full snapshot in one file.

    vmipc checkpoint [--socket PATH] FILE [--track | --incremental --parent PARENT]
                     [--with-disk] [--leave-paused] [--no-verify] [--lease SECONDS] [--json]
                     [--timeline]
    vmipc suspend    [--socket PATH] FILE [--incremental --parent PARENT] [--with-disk]
                     [--no-verify] [--lease SECONDS] [--json] [--timeline]

The file is written under a temporary name in FILE's directory and renamed into place
once complete, checked and fsynced: FILE is either the previous file or the whole new
snapshot, never a part of one. ``--track`` starts dirty logging with a full checkpoint;
``--incremental --parent PARENT`` then writes only the pages written since PARENT (the
newest snapshot of the chain, taken from this VMM). The VM is paused with a pause lease
(``--lease``): if this command dies before it resumes the VM (or publishes the file),
the VMM resumes the guest by itself. ``--with-disk`` puts the block device's image in the
file too (sparse), so that the VM and its disk move as one file (restore it with
``vmipc vmm --restore FILE --disk-from-snapshot NEWIMG``). Exit codes: 0 done; 1 a step failed
(one line says which and what became of the VM: a VM this command paused is resumed);
2 bad usage; 3 the VMM cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmipc.cli import EXIT_USAGE
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
from vmipc.client import open_client
from vmipc.sequences import (
    CheckpointMode,
    Full,
    Incremental,
    Live,
    SnapshotReport,
    Then,
    checkpoint,
)


def add_parser(subparsers: Any) -> None:
    for name, doc in (
        ("checkpoint", "write a snapshot of a VM to one file; the VM runs on"),
        ("suspend", "write a snapshot of a VM to one file, then quit its VMM"),
    ):
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name,
            help=doc,
            description=(
                f"{doc[0].upper()}{doc[1:]}. Pause, dump-state and dump-memory into a "
                "temporary file beside FILE, seal it (section table), check it, then "
                "rename it to FILE. See docs/sequences.md."
            ),
            epilog="exit codes: 0 done; 1 a step failed; 2 bad usage; 3 VMM unreachable",
        )
        add_socket_argument(parser)
        parser.add_argument("file", metavar="FILE", help="the snapshot file to write")
        if name == "checkpoint":
            parser.add_argument(
                "--leave-paused",
                action="store_true",
                help="leave the VM paused afterwards instead of resuming it",
            )
            parser.add_argument(
                "--track",
                action="store_true",
                help="(full checkpoint) start dirty logging before resuming, so that "
                "incremental checkpoints can follow this one",
            )
            parser.add_argument(
                "--live",
                action="store_true",
                help="(full checkpoint of a running VM) copy RAM while the guest runs, then "
                "only what it wrote meanwhile while it is paused: a short pause for a big VM",
            )
        parser.add_argument(
            "--incremental",
            action="store_true",
            help="write only the pages written since --parent was taken (needs dirty "
            "logging running since then: a full checkpoint with --track, then increments)",
        )
        parser.add_argument(
            "--parent",
            metavar="PARENT",
            help="the previous snapshot of the chain (with --incremental)",
        )
        parser.add_argument(
            "--with-disk",
            action="store_true",
            help="put the block device's image in the file too (sparse; while the VM is "
            "paused): restore it with `vmipc vmm --restore FILE --disk-from-snapshot NEWIMG`",
        )
        parser.add_argument(
            "--no-verify",
            action="store_true",
            help="do not read the file back to check every checksum before publishing it",
        )
        add_lease_argument(parser, "the VM's pause")
        add_output_arguments(parser)
        parser.set_defaults(run=run, _sequence=name)


def _lines(data: dict[str, Any]) -> list[str]:
    lines = [
        f"snapshot   {data['path']} ({data['size']} bytes)",
        f"id         {data['snapshot_id']} (table checksum {data['table_checksum']:#018x})",
    ]
    if data["parent_id"]:
        lines.append(
            f"parent     {data['parent_id']} (incremental: {data['incremental_pages']} pages)"
        )
    lines += [
        f"vm         {data['vm']}" + (", dirty logging on" if data["tracking"] else ""),
        f"downtime   {data['downtime_s'] * 1000:.1f} ms",
        f"total      {data['total_s'] * 1000:.1f} ms",
    ]
    return lines


def _mode(args: argparse.Namespace) -> CheckpointMode | str:
    """The checkpoint's mode from its options, or why they make none."""
    track = live = False
    if args._sequence == "checkpoint":
        track, live = args.track, args.live
    if args.incremental != (args.parent is not None):
        return "--incremental and --parent PARENT go together"
    if args.lease < 0:
        return "--lease must be positive (0 for a plain pause)"
    if args.incremental and track:
        return "--track is for full checkpoints (increments keep it on)"
    if args.incremental and live:
        return "--live is for full checkpoints"
    if args.incremental:
        return Incremental(args.parent)
    return Live(track) if live else Full(track)


def run(args: argparse.Namespace) -> int:
    prog = f"vmipc {args._sequence}"
    path = socket_path(args, prog)
    if path is None:
        return EXIT_USAGE
    then: Then = "quit"
    if args._sequence == "checkpoint":
        then = "pause" if args.leave_paused else "resume"
    mode = _mode(args)
    if isinstance(mode, str):
        print(f"{prog}: {mode}", file=sys.stderr)
        return EXIT_USAGE

    view, hooks = progress_hooks(args)

    async def main() -> SnapshotReport:
        async with open_client(path, client_name=prog) as client:
            return await checkpoint(
                client,
                args.file,
                mode=mode,
                then=then,
                verify=not args.no_verify,
                lease=lease_of(args),
                with_disk=args.with_disk,
                **hooks,
            )

    try:
        code, report = run_sequence(prog, main)
    finally:
        if view is not None:
            view.close()
    if report is not None:
        print_report(report, args.json, _lines, args.timeline)
    return code
